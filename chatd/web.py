"""The REST API (API.md, "REST") as Tornado handlers, and the app factory.

Handlers are thin: read the path, query and JSON body, take the caller from
the bearer token, call one ChatService method, write its answer. Every error
is ``{"error": {"code", "message"}}`` with its status (see chatd.errors).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from dataclasses import dataclass, field

import orjson
import tornado.httputil
import tornado.web

from . import accesslog, validate
from .auth import TokenVerifier, bearer
from .domain import ChatService
from .errors import (
    ApiError,
    BadRequest,
    InvalidJson,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)

log = logging.getLogger("chatd.web")

# API.md: any request body over 64 KiB is 413, checked before anything else.
MAX_BODY = 64 * 1024
JSON_TYPE = "application/json; charset=utf-8"
# Response headers browser code may read on a cross-origin answer.
EXPOSED_HEADERS = "X-Request-Id, Retry-After"


@dataclass
class Context:
    """What handlers need, handed to each through initialize()."""

    domain: ChatService
    verifier: TokenVerifier
    cors_origins: tuple[str, ...] = ()
    readiness: object = None  # async callable -> list of down stores
    metrics: object = None  # chatd.metrics.Metrics
    inflight: Inflight = field(default_factory=lambda: Inflight())
    extra: dict = field(default_factory=dict)


class Inflight:
    """REST requests being answered, so a stop can wait for them (server.py).

    A request counts from when its body has arrived: a stop does not wait for
    a client still sending one (chatd.httpconn cuts such bodies off after
    BODY_TIMEOUT, and a stop closes their connections)."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = False  # set at SIGTERM: answers say Connection: close
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count <= 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        """True when nothing is in flight (within ``seconds``)."""
        if self.count <= 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
            return True
        except TimeoutError:
            return False


# A client's X-Request-Id is kept when it looks like an id (it is echoed in a
# header and written to logs, so nothing that could inject either).
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id_from(given: str | None) -> str | None:
    """A client's request id if it is sane, else None."""
    return given if given and _REQUEST_ID_RE.match(given) else None


# Request ids chatd makes: a random per-process prefix and a counter, 32 hex
# digits like a UUID's; unique without a random draw (a syscall) per request.
_RID_PREFIX = secrets.token_hex(8)
_rid_counter = itertools.count(1)


def request_id_of(request) -> str:
    """The request's id: the client's X-Request-Id if sane, else a new one (cached)."""
    rid = getattr(request, "_chatd_request_id", None)
    if rid is None:
        rid = request_id_from(request.headers.get("X-Request-Id")) or new_request_id()
        request._chatd_request_id = rid
    return rid


def new_request_id() -> str:
    return f"{_RID_PREFIX}{next(_rid_counter):016x}"


_date = [0, ""]  # the Date header of the current second


def http_date() -> str:
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, tornado.httputil.format_timestamp(now)
    return _date[1]


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """Authentication, body limits, JSON bodies, CORS and the error shape."""

    METHODS: tuple[str, ...] = ()
    PUBLIC = False  # True: no token needed
    ROUTE = "unmatched"  # the route's pattern, as in the OpenAPI document and metrics

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx
        self.domain = ctx.domain
        self.user_id = ""
        self._body_parts: list[bytes] = []
        self._body_size = 0
        self._too_large = False
        self._counted = False  # in ctx.inflight: from when the body has arrived
        # RequestHandler.__init__ cleared the headers before ctx was here (see
        # clear()): the default ones are set now.
        self.set_default_headers()

    def finish(self, chunk=None):
        if self.ctx.inflight.draining and not self._headers_written:
            # Answered during a stop: tell keep-alive clients to go elsewhere.
            self.set_header("Connection", "close")
        return super().finish(chunk)

    def on_finish(self) -> None:
        if self._counted:
            self._counted = False
            self.ctx.inflight.leave()

    # -- request plumbing -------------------------------------------------------

    def clear(self) -> None:
        # Tornado's clear(), without formatting the Date header anew for every
        # response (once a second here) or announcing "TornadoServer/x.y".
        # RequestHandler.__init__ calls it before initialize(): the headers
        # that need ctx are set by set_default_headers() once ctx is there.
        headers = tornado.httputil.HTTPHeaders()
        headers["Content-Type"] = JSON_TYPE
        headers["Date"] = http_date()
        self._headers = headers
        if getattr(self, "ctx", None) is not None:
            self.set_default_headers()
        self._write_buffer = []
        self._status_code = 200
        self._reason = "OK"

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", JSON_TYPE)
        self.set_header("X-Request-Id", request_id_of(self.request))
        ctx = self.ctx
        if origin_allowed(self.request.headers.get("Origin"), ctx.cors_origins):
            self.set_header("Access-Control-Allow-Origin", self.request.headers["Origin"])
            self.set_header("Access-Control-Allow-Credentials", "true")
            # On every answer, not only preflights: that is where browser code
            # reads them (X-Request-Id for a bug report, Retry-After on a 429).
            self.set_header("Access-Control-Expose-Headers", EXPOSED_HEADERS)
        if ctx.cors_origins:
            self.set_header("Vary", "Origin")

    def compute_etag(self) -> None:
        # Tornado hashes every GET body for an ETag by default: a SHA-1 per
        # history page, for revalidation no chat client does.
        return None

    async def prepare(self) -> None:
        method = self.request.method
        if method == "OPTIONS":
            self._preflight()
            return
        length = self._check_length()
        if method not in self.METHODS:
            raise tornado.web.HTTPError(405)
        # A chunked body announces no size: read it first (data_received caps
        # it), so an oversize one is 413 before the token is looked at, as
        # API.md asks of every body.
        late = not self.PUBLIC and length is None and "Transfer-Encoding" in self.request.headers
        if not (self.PUBLIC or late):
            self._authenticate()
        self._after_body(authenticate=late)

    def _check_length(self) -> str | None:
        """The Content-Length header; 413 when it announces more than MAX_BODY.
        (chatd.httpconn has refused a malformed one already.)"""
        length = self.request.headers.get("Content-Length")
        if length is not None:
            if not length.isdigit():
                raise BadRequest("Content-Length must be a non-negative integer")
            if int(length) > MAX_BODY:
                raise PayloadTooLarge(f"request body is larger than {MAX_BODY} bytes")
        return length

    def _authenticate(self) -> None:
        self.user_id = self.ctx.verifier.verify(bearer(self.request.headers.get("Authorization")))

    def _after_body(self, authenticate: bool) -> None:
        name = self.request.method.lower()
        method = getattr(self, name)

        async def with_body(*args, **kwargs):
            self._counted = True  # in flight from now: a stop waits for it
            self.ctx.inflight.enter()
            if self._too_large:
                raise PayloadTooLarge(f"request body is larger than {MAX_BODY} bytes")
            if authenticate:
                self._authenticate()
            result = method(*args, **kwargs)
            if result is not None:
                await result

        # Tornado looks the method up by name after the body has arrived.
        setattr(self, name, with_body)

    def _preflight(self) -> None:
        if origin_allowed(self.request.headers.get("Origin"), self.ctx.cors_origins):
            self.set_header("Access-Control-Allow-Methods", ", ".join(self.METHODS))
            self.set_header(
                "Access-Control-Allow-Headers", "Authorization, Content-Type, X-Request-Id"
            )
            self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.clear_header("Content-Type")
        self.finish()

    def options(self, *args) -> None:  # answered in prepare()
        pass

    def data_received(self, chunk: bytes) -> None:
        if self._too_large:
            return
        self._body_size += len(chunk)
        if self._body_size > MAX_BODY:  # chunked bodies carry no Content-Length
            self._too_large = True
            self._body_parts.clear()
            return
        self._body_parts.append(chunk)

    def json_body(self, optional: bool = False) -> object:
        if self._too_large:
            raise PayloadTooLarge(f"request body is larger than {MAX_BODY} bytes")
        raw = b"".join(self._body_parts)
        if not raw.strip():
            if optional:
                return None
            raise InvalidJson("request body must be a JSON document")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidJson("request body is not valid JSON") from None

    def query(self, name: str) -> str | None:
        values = self.request.query_arguments.get(name)
        if not values:
            return None
        try:
            return values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{name} must be UTF-8") from None

    def send_json(self, body: bytes | dict | list, status: int = 200) -> None:
        self.set_status(status)
        self.finish(body if isinstance(body, bytes) else orjson.dumps(body))

    def no_content(self) -> None:
        self.set_status(204)
        self.clear_header("Content-Type")
        self.finish()

    # -- errors -------------------------------------------------------------------

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(exc, ApiError):
            exc = _from_http_status(status_code, exc)
        self.set_status(exc.status)
        for name, value in exc.headers.items():
            self.set_header(name, value)
        self.finish(orjson.dumps(exc.body()))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, (ApiError, tornado.web.HTTPError)):
            return  # an answer, not a fault
        # Tornado's own line quotes the full URI (query string included); this
        # one has the path only, like the access log.
        log.error(
            "uncaught exception in %s %s rid=%s",
            self.request.method,
            self.request.path,
            request_id_of(self.request),
            exc_info=(typ, value, tb),
        )


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    return bool(origin) and (origin in allowed or "*" in allowed)


def _from_http_status(status: int, exc: object) -> ApiError:
    """An ApiError for what Tornado raised itself (routing, methods, parsing)."""
    if status == 405:
        return MethodNotAllowed("method not allowed here")
    if status == 404:
        return NotFound("no such route")
    if status == 413:
        return PayloadTooLarge(f"request body is larger than {MAX_BODY} bytes")
    if 400 <= status < 500:
        return BadRequest("bad request")
    log.error("internal error: %r", exc)
    return ApiError("internal error")


class MessagesHandler(BaseHandler):
    METHODS = ("GET", "POST")

    async def get(self, chat_id: str) -> None:
        page = await self.domain.history(
            self.user_id,
            chat_id,
            limit=validate.query_int(self.query("limit"), "limit"),
            before_seq=validate.query_int(self.query("before_seq"), "before_seq"),
            after_seq=validate.query_int(self.query("after_seq"), "after_seq"),
            include_deleted=validate.query_bool(self.query("include_deleted"), "include_deleted"),
        )
        self.send_json(page.json())

    async def post(self, chat_id: str) -> None:
        body = validate.json_object(self.json_body())
        posted = await self.domain.send(
            self.user_id, chat_id, body.get("content"), body.get("client_id"),
            reply_to=body.get("reply_to"),
        )  # fmt: skip
        self.send_json(posted.raw, 201 if posted.created else 200)


class LegacyDeleteHandler(BaseHandler):
    """``DELETE /message/?id=`` as the original service had it."""

    METHODS = ("DELETE",)

    async def delete(self) -> None:
        raw = self.query("id")
        if raw is None:
            raise BadRequest("id query parameter is required")
        await self.domain.delete(self.user_id, raw)
        self.no_content()


class MessageHandler(BaseHandler):
    METHODS = ("DELETE", "PATCH")

    async def delete(self, message_id: str) -> None:
        await self.domain.delete(self.user_id, message_id)
        self.no_content()

    async def patch(self, message_id: str) -> None:
        body = validate.json_object(self.json_body())
        posted = await self.domain.edit(self.user_id, message_id, body.get("content"))
        self.send_json(posted.raw)


class ChatsHandler(BaseHandler):
    METHODS = ("GET", "POST")

    async def get(self) -> None:
        self.send_json({"chats": await self.domain.list_chats(self.user_id)})

    async def post(self) -> None:
        self.send_json(await self.domain.create_chat(self.user_id, self.json_body()), 201)


class ChatHandler(BaseHandler):
    METHODS = ("GET",)

    async def get(self, chat_id: str) -> None:
        self.send_json(await self.domain.get_chat(self.user_id, chat_id))


class MemberHandler(BaseHandler):
    METHODS = ("PUT", "DELETE")

    async def put(self, chat_id: str, user_id: str) -> None:
        body = self.json_body(optional=True)
        self.send_json(await self.domain.put_member(self.user_id, chat_id, user_id, body))

    async def delete(self, chat_id: str, user_id: str) -> None:
        await self.domain.remove_member(self.user_id, chat_id, user_id)
        self.no_content()


class ReadHandler(BaseHandler):
    METHODS = ("POST",)

    async def post(self, chat_id: str) -> None:
        body = validate.json_object(self.json_body())
        await self.domain.mark_read(self.user_id, chat_id, body.get("seq"))
        self.no_content()


# -- version 2: conversations and exact sync ------------------------------------


class ChangesHandler(BaseHandler):
    METHODS = ("GET",)

    async def get(self, chat_id: str) -> None:
        page, version = await self.domain.changes(
            self.user_id,
            chat_id,
            validate.query_int(self.query("since_version"), "since_version"),
            validate.query_int(self.query("limit"), "limit"),
        )
        self.send_json(page.json()[:-1] + b',"version":' + str(version).encode() + b"}")


class RepliesHandler(BaseHandler):
    METHODS = ("GET",)

    async def get(self, message_id: str) -> None:
        page = await self.domain.replies(
            self.user_id,
            message_id,
            limit=validate.query_int(self.query("limit"), "limit"),
            after_seq=validate.query_int(self.query("after_seq"), "after_seq"),
        )
        self.send_json(page.json())


class ReactionHandler(BaseHandler):
    METHODS = ("PUT", "DELETE")

    async def put(self, message_id: str, emoji: str) -> None:
        self.send_json((await self.domain.react(self.user_id, message_id, emoji)).raw)

    async def delete(self, message_id: str, emoji: str) -> None:
        posted = await self.domain.react(self.user_id, message_id, emoji, remove=True)
        self.send_json(posted.raw)


class EditHistoryHandler(BaseHandler):
    METHODS = ("GET",)

    async def get(self, message_id: str) -> None:
        self.send_json(await self.domain.edit_history(self.user_id, message_id))


class PinHandler(BaseHandler):
    METHODS = ("PUT", "DELETE")

    async def put(self, chat_id: str, message_id: str) -> None:
        self.send_json((await self.domain.pin(self.user_id, chat_id, message_id)).raw)

    async def delete(self, chat_id: str, message_id: str) -> None:
        posted = await self.domain.pin(self.user_id, chat_id, message_id, unpin=True)
        self.send_json(posted.raw)


class PinsHandler(BaseHandler):
    METHODS = ("GET",)

    async def get(self, chat_id: str) -> None:
        page = await self.domain.pins(self.user_id, chat_id)
        self.send_json(b'{"messages":[' + b",".join(page.rows) + b"]}")


class SearchHandler(BaseHandler):
    METHODS = ("GET",)

    async def get(self) -> None:
        page = await self.domain.search(
            self.user_id,
            self.query("q"),
            self.query("chat_id"),
            limit=validate.query_int(self.query("limit"), "limit"),
            before_id=validate.query_int(self.query("before_id"), "before_id", 1),
        )
        self.send_json(page.json())


class MentionsHandler(BaseHandler):
    METHODS = ("GET",)

    async def get(self) -> None:
        page = await self.domain.mentions(
            self.user_id,
            limit=validate.query_int(self.query("limit"), "limit"),
            before_id=validate.query_int(self.query("before_id"), "before_id", 1),
            unread=validate.query_bool(self.query("unread"), "unread"),
        )
        self.send_json(page.json())


class DirectHandler(BaseHandler):
    METHODS = ("PUT",)

    async def put(self, user_id: str) -> None:
        chat, created = await self.domain.open_direct(self.user_id, user_id)
        self.send_json(chat, 201 if created else 200)


class HealthHandler(BaseHandler):
    """The process answers: for a liveness probe (no store is asked)."""

    METHODS = ("GET",)
    PUBLIC = True

    def get(self) -> None:
        self.send_json(b'{"ok":true}')


class ReadyHandler(BaseHandler):
    METHODS = ("GET",)
    PUBLIC = True

    async def get(self) -> None:
        down = await self.ctx.readiness() if self.ctx.readiness else []
        if down:
            raise Unavailable(f"unavailable: {', '.join(down)}")
        self.send_json(b'{"ok":true}')


class MetricsHandler(BaseHandler):
    METHODS = ("GET",)
    PUBLIC = True

    def get(self) -> None:
        from .metrics import CONTENT_TYPE

        if self.ctx.metrics is None:
            raise NotFound("metrics are not enabled")
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(self.ctx.metrics.render())


class OpenApiHandler(BaseHandler):
    METHODS = ("GET",)
    PUBLIC = True

    def get(self) -> None:
        from .openapi import document_bytes

        self.send_json(document_bytes())


class NotFoundHandler(BaseHandler):
    """Every path no route matches: a JSON 404, whatever the method."""

    METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    PUBLIC = True

    async def prepare(self) -> None:
        self._check_length()  # API.md: the body limit comes before anything else
        raise NotFound("no such route")


# (tornado pattern, handler, the route as the OpenAPI document names it)
_SEG = r"([^/]+)"
ROUTE_TABLE = [
    (r"/chats/?", ChatsHandler, "/chats"),
    (rf"/chats/{_SEG}/?", ChatHandler, "/chats/{chat_id}"),
    (rf"/chats/{_SEG}/messages/?", MessagesHandler, "/chats/{chat_id}/messages"),
    (rf"/chats/{_SEG}/members/{_SEG}/?", MemberHandler, "/chats/{chat_id}/members/{user_id}"),
    (rf"/chats/{_SEG}/read/?", ReadHandler, "/chats/{chat_id}/read"),
    (r"/message/?", LegacyDeleteHandler, "/message/"),
    (rf"/messages/{_SEG}/?", MessageHandler, "/messages/{id}"),
    (rf"/chats/{_SEG}/changes/?", ChangesHandler, "/chats/{chat_id}/changes"),
    (rf"/chats/{_SEG}/pins/?", PinsHandler, "/chats/{chat_id}/pins"),
    (rf"/chats/{_SEG}/pins/{_SEG}/?", PinHandler, "/chats/{chat_id}/pins/{message_id}"),
    (rf"/messages/{_SEG}/replies/?", RepliesHandler, "/messages/{id}/replies"),
    (rf"/messages/{_SEG}/history/?", EditHistoryHandler, "/messages/{id}/history"),
    (rf"/messages/{_SEG}/reactions/{_SEG}/?", ReactionHandler, "/messages/{id}/reactions/{emoji}"),
    (r"/search/?", SearchHandler, "/search"),
    (r"/mentions/?", MentionsHandler, "/mentions"),
    (rf"/direct/{_SEG}/?", DirectHandler, "/direct/{user_id}"),
    (r"/healthz", HealthHandler, "/healthz"),
    (r"/readyz", ReadyHandler, "/readyz"),
    (r"/metrics", MetricsHandler, "/metrics"),
    (r"/openapi.json", OpenApiHandler, "/openapi.json"),
]
for _pattern, _handler, _route in ROUTE_TABLE:
    _handler.ROUTE = _route


def routes(ctx: Context) -> list:
    return [(pattern, handler, {"ctx": ctx}) for pattern, handler, _route in ROUTE_TABLE]


def make_app(
    ctx: Context, socketio_handler: type | None = None, **settings
) -> tornado.web.Application:
    handlers = routes(ctx)
    if "console" in ctx.extra:  # the web console (chatd.webconsole), unless CHATD_CONSOLE=off
        from .webconsole import routes as console_routes

        handlers += console_routes(ctx)
    if socketio_handler is not None:
        handlers.insert(0, (r"/socket.io/", socketio_handler))
    return tornado.web.Application(
        handlers,
        default_handler_class=NotFoundHandler,
        default_handler_args={"ctx": ctx},
        # engine.io enforces its own packet limit; tornado's websocket cap is a
        # backstop just above it.
        websocket_max_message_size=2 * MAX_BODY,
        compress_response=False,
        chatd_ctx=ctx,
        **settings,
    )


def access_log(method: str, path: str, status: int, rid: str) -> None:
    """The access line of an answer given without a handler (chatd.httpconn)."""
    if accesslog.enabled(logging.INFO):
        extra = {"request_id": rid, "method": method, "path": path, "status": status}
        accesslog.log(logging.INFO, method, path, status, rid, extra)


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Metrics and one log line per request. The path only, never the query
    string: a socket handshake may carry ``?token=``."""
    request = handler.request
    seconds = request.request_time()
    status = handler.get_status()
    route = getattr(handler, "ROUTE", None) or "/socket.io/"
    ctx = getattr(handler, "ctx", None) or handler.settings.get("chatd_ctx")
    if ctx is not None and ctx.metrics is not None:
        ctx.metrics.observe(route, request.method, status, seconds)
    # Socket.IO's own requests (the handshake, each long poll, the upgrade)
    # are 4-6 per connection: at debug level, as chatd logs one connect and
    # one disconnect line per socket. Its refusals (4xx, 5xx) stay visible.
    level = logging.DEBUG if route == "/socket.io/" and status < 400 else logging.INFO
    if not accesslog.enabled(level):
        return
    rid = request_id_of(request)
    method, path = request.method, request.path
    extra = {
        "request_id": rid,
        "method": method,
        "path": path,
        "route": route,
        "status": status,
        "duration_ms": round(1000.0 * seconds, 1),
        "remote_ip": request.remote_ip,
    }
    accesslog.log(level, method, path, status, rid, extra)
