"""The REST API (API.md, "REST") as Tornado handlers, and the app factory.

Handlers are thin: read the path, query and JSON body, take the caller from
the bearer token, call one ChatService method, write its answer. Every error
is ``{"error": {"code", "message"}}`` with its status (see chatd.errors).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import orjson
import tornado.web

from . import validate
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


@dataclass
class Context:
    """What handlers need, handed to each through initialize()."""

    domain: ChatService
    verifier: TokenVerifier
    cors_origins: tuple[str, ...] = ()
    readiness: object = None  # async callable -> list of down stores
    extra: dict = field(default_factory=dict)


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """Authentication, body limits, JSON bodies, CORS and the error shape."""

    METHODS: tuple[str, ...] = ()
    PUBLIC = False  # True: no token needed

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx
        self.domain = ctx.domain
        self.user_id = ""
        self._body_parts: list[bytes] = []
        self._body_size = 0
        self._too_large = False

    # -- request plumbing -------------------------------------------------------

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", JSON_TYPE)
        origin = self.request.headers.get("Origin")
        if origin and (origin in self.ctx.cors_origins or "*" in self.ctx.cors_origins):
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Credentials", "true")
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
        if self.PUBLIC:
            return
        if length is None and "chunked" in self.request.headers.get("Transfer-Encoding", ""):
            # A chunked body announces no size: read it first (data_received caps
            # it), so an oversize one is 413 before the token is looked at, as
            # API.md asks of every body.
            self._authenticate_after_body()
        else:
            self._authenticate()

    def _check_length(self) -> str | None:
        """The Content-Length header; 413 when it announces more than MAX_BODY."""
        length = self.request.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise PayloadTooLarge(f"request body is larger than {MAX_BODY} bytes")
        return length

    def _authenticate(self) -> None:
        self.user_id = self.ctx.verifier.verify(bearer(self.request.headers.get("Authorization")))

    def _authenticate_after_body(self) -> None:
        name = self.request.method.lower()
        method = getattr(self, name)

        async def authenticated(*args, **kwargs):
            if self._too_large:
                raise PayloadTooLarge(f"request body is larger than {MAX_BODY} bytes")
            self._authenticate()
            result = method(*args, **kwargs)
            if result is not None:
                await result

        # Tornado looks the method up by name after the body has arrived.
        setattr(self, name, authenticated)

    def _preflight(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin and (origin in self.ctx.cors_origins or "*" in self.ctx.cors_origins):
            self.set_header("Access-Control-Allow-Methods", ", ".join(self.METHODS))
            self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
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
        super().log_exception(typ, value, tb)


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
            self.user_id, chat_id, body.get("content"), body.get("client_id")
        )
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


class HealthHandler(BaseHandler):
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


class NotFoundHandler(BaseHandler):
    """Every path no route matches: a JSON 404, whatever the method."""

    METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    PUBLIC = True

    async def prepare(self) -> None:
        self._check_length()  # API.md: the body limit comes before anything else
        raise NotFound("no such route")


def routes(ctx: Context) -> list:
    seg = r"([^/]+)"
    table = [
        (r"/chats/?", ChatsHandler),
        (rf"/chats/{seg}/?", ChatHandler),
        (rf"/chats/{seg}/messages/?", MessagesHandler),
        (rf"/chats/{seg}/members/{seg}/?", MemberHandler),
        (rf"/chats/{seg}/read/?", ReadHandler),
        (r"/message/?", LegacyDeleteHandler),
        (rf"/messages/{seg}/?", MessageHandler),
        (r"/healthz", HealthHandler),
        (r"/readyz", ReadyHandler),
    ]
    return [(pattern, handler, {"ctx": ctx}) for pattern, handler in table]


def make_app(
    ctx: Context, socketio_handler: type | None = None, **settings
) -> tornado.web.Application:
    handlers = routes(ctx)
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
        **settings,
    )


_access = logging.getLogger("chatd.access")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """One line per request. The path only: query strings may carry tokens."""
    if not _access.isEnabledFor(logging.INFO):
        return
    request = handler.request
    _access.info(
        "%s %s %d %.1fms",
        request.method,
        request.path,
        handler.get_status(),
        1000.0 * request.request_time(),
    )
