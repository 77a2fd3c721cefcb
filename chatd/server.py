"""The chatd daemon: configuration, the stores, one Tornado app with the REST
API and Socket.IO on one port, and an orderly stop on SIGTERM/SIGINT.

Start: with no database configured, the embedded PostgreSQL and Redis start
first (chatd.embedded, blocking, before the event loop exists); then the
pools, the app, the listening socket, and ``READY=1`` to systemd.

Stop (SIGTERM or SIGINT), in this order, so that nothing answered is lost:

1. ``STOPPING=1``; the listening socket closes (no new connections) and
   answers from now on carry ``Connection: close``;
2. every Socket.IO connection is closed at the transport level: clients see a
   "transport close" and their auto-reconnect takes them to another process
   (a Socket.IO DISCONNECT packet would tell them *not* to reconnect);
3. in-flight REST requests get up to ``SHUTDOWN_TIMEOUT`` seconds to finish:
   a send that commits is still answered 201;
4. remaining connections close, background cache writes finish, the pools
   close, the embedded servers (if any) shut down, exit status 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gc
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time

import orjson
import socketio
import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web
import tornado.websocket
from tornado.httputil import HTTPHeaders

from . import (
    accesslog,
    cache,
    config,
    embedded,
    fairselect,
    httpconn,
    limits,
    migrations,
    presence,
    realtime,
    sdnotify,
    web,
    wsframes,
)
from .auth import TokenVerifier
from .domain import ChatService
from .errors import Unavailable
from .metrics import CountingEvents, Metrics
from .storage import Storage

log = logging.getLogger("chatd")

# Seconds a connection may wait for a request head (idle keep-alive, or a head
# that trickles in) before it is closed; longer than the 60 s keep-alive
# timeout of nginx's upstream and of most client pools, so that they close first.
IDLE_CONNECTION_TIMEOUT = 75.0

# Attributes every LogRecord has; anything else was passed in ``extra=``.
_RECORD_KEYS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


# Belt and braces: chatd logs paths without query strings and never headers,
# but a library's message or a traceback could quote a URL or a header. Tokens
# in ``token=``/``access_token=`` parameters, after ``Bearer`` and JWT-shaped
# strings are masked in every line, whatever logged it.
_SECRET_RES = (
    (re.compile(r"((?:access_)?token=)[^&\s'\"]+", re.I), r"\1***"),
    (re.compile(r"(Bearer\s+)[^\s'\",]+", re.I), r"\1***"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+"), "<jwt>"),
)


_LITERAL_SECRETS: set[str] = set()


def redact(text: str) -> str:
    # The regular expressions only where their trigger occurs: most lines (one
    # per request) have none, and three substitutions were ~40% of a line's cost.
    lowered = text.lower()
    if "token=" in lowered or "bearer" in lowered or "eyJ" in text:
        for pattern, replacement in _SECRET_RES:
            text = pattern.sub(replacement, text)
    for secret in _LITERAL_SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line, with the ``extra=`` fields
    (request_id, route, status, ...) as keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_KEYS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str, ensure_ascii=False))


def _password(url: str | None) -> str | None:
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(url).password or "") if url else None


def setup_logging(settings: config.Settings) -> None:
    # One handler for every record, which also writes the access lines
    # (chatd.accesslog: formatted directly, written once per loop turn).
    handler = accesslog.LogHandler(sys.stderr, settings.log_format == "json", redact)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for secret in (settings.access_token_secret, _password(settings.database_url),
                   _password(settings.redis_url)):  # fmt: skip
        if secret and len(secret) >= 4:
            _LITERAL_SECRETS.add(secret)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Tornado's access log is replaced by chatd's own request line (web.log_request).
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


class Chatd:
    """One chatd process: start() binds and serves, stop() drains and closes."""

    def __init__(
        self,
        settings: config.Settings,
        sockets: list | None = None,
        servers: embedded.EmbeddedServers | None = None,
    ):
        self.settings = settings
        self._sockets = sockets  # bound already (main, CHATD_WORKERS): accept on these
        self.servers = servers  # the embedded PostgreSQL/Redis, when chatd runs them
        self.storage: Storage | None = None
        self.redis = None
        self.sio: socketio.AsyncServer | None = None
        self.domain: ChatService | None = None
        self.presence: presence.Presence | presence.LocalPresence | None = None
        self.http: tornado.httpserver.HTTPServer | None = None
        self.port = 0
        self.metrics = Metrics()
        self.ctx: web.Context | None = None

    async def start(self) -> None:
        s = self.settings
        if s.database_url is None:
            raise config.ConfigError(
                "no database configured: set DATABASE_URL (or DB_HOST, DB_NAME, DB_USER, ...)"
            )
        self.storage = await Storage.connect(s.database_url, s.db_pool_size, s.db_timeout)
        self.storage.search_config = s.search_language
        try:
            await self.storage.check_search_config(s.search_language)
        except ValueError as exc:
            raise config.ConfigError(str(exc)) from None
        if s.redis_url:
            self.redis = cache.connect(s.redis_url, s.redis_timeout)
        else:
            log.warning("no REDIS_URL/REDIS_HOST: no page cache, and one process only")
        page_cache = cache.PageCache(self.redis, s.redis_prefix, s.cache_rows, s.cache_ttl)
        manager = None  # realtime.create_server: one process, rooms in memory
        if s.redis_url:
            # Emits go through Redis to every chatd process sharing it, so a
            # room's sockets get an event wherever they are connected.
            manager = realtime.RedisChatManager(
                s.redis_url,
                s.socketio_channel,
                publisher=self.redis,
                connect_timeout=s.redis_timeout,
                json=realtime.OrjsonPackets,
            )
            self.presence = presence.Presence(self.redis, s.redis_prefix, s.presence_ttl)
        else:
            self.presence = presence.LocalPresence()
        self.sio = realtime.create_server(s.cors_origins, manager)
        events = CountingEvents(realtime.SocketEvents(self.sio), self.metrics)
        limiter = limits.RateLimiter(
            self.redis,
            s.redis_prefix,
            {limits.SENDS: s.rate_limit_sends, limits.EVENTS: s.rate_limit_events},
        )
        self.domain = ChatService(
            self.storage,
            page_cache,
            events,
            s.max_message_length,
            gate=presence.Gate(self.redis, s.redis_prefix),
            limiter=limiter,
        )
        self.metrics.watch(
            sockets=lambda: len(self.sio.eio.sockets),
            cache=page_cache,
            pool=lambda: self.storage.pool_stats,
            relay=getattr(self.sio.manager, "relay", None),
        )
        verifier = TokenVerifier(
            s.access_token_secret, s.jwt_user_claims, s.jwt_audience, s.jwt_issuer
        )
        self.sio.register_namespace(realtime.ChatNamespace(self.domain, verifier, self.presence))
        await self.sio.manager.start(s.redis_timeout + 1)
        await self.presence.start()
        self.ctx = ctx = web.Context(
            domain=self.domain,
            verifier=verifier,
            cors_origins=s.cors_origins,
            readiness=self.readiness,
            metrics=self.metrics,
        )
        if s.console:
            from . import webconsole

            ctx.extra["console"] = webconsole.Console(s)
        app = web.make_app(ctx, self._socket_handler(), log_function=web.log_request)
        ssl_options = None
        if s.tls:
            import ssl

            ssl_options = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_options.load_cert_chain(s.tls_cert_file, s.tls_key_file)
        self.http = HTTPServer(
            app,
            ssl_options=ssl_options,
            xheaders=True,
            # Bodies stream through BaseHandler, which answers 413 past 64 KiB;
            # this only cuts off a client that keeps sending after that.
            max_body_size=1024 * 1024,
            idle_connection_timeout=IDLE_CONNECTION_TIMEOUT,
            # A body not received within this is answered 408 (chatd.httpconn).
            body_timeout=s.body_timeout,
        )
        sockets = self._sockets or bind(s)
        self.http.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        scheme = "https" if s.tls else "http"
        log.info("chatd listening on %s://%s:%d", scheme, s.host or "0.0.0.0", self.port)

    def _socket_handler(self) -> type:
        compression = self.settings.ws_compression
        base = socketio.get_tornado_handler(self.sio)
        guard = realtime.OriginGuard(self.settings.cors_origins)

        class SocketHandler(base):
            def prepare(self):
                # A browser on an origin FRONTENDADDRES does not allow: JSON 403
                # before the websocket handshake or engine.io see the request.
                refusal = guard.refusal(self.request.headers.get("Origin"), self.request.host)
                if refusal is not None:
                    self.set_status(refusal.status)
                    self.set_header("Content-Type", web.JSON_TYPE)
                    self.finish(orjson.dumps(refusal.body()))
                    return None
                return super().prepare()

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                # engine.io's handler keeps an asyncio.Queue per connection for
                # incoming frames (four deques, ~3 KB); this inbox does the same
                # job in a list and one future.
                self.receive_queue = _Inbox()

            def open(self, *args, **kwargs):
                # Upgraded: this connection's events may wait their turn when
                # thousands of websockets are ready at once (chatd.fairselect).
                conn = self.ws_connection
                sock = getattr(conn.stream, "socket", None) if conn is not None else None
                if sock is not None:
                    self._bulk_fd = sock.fileno()
                    fairselect.mark_bulk(asyncio.get_running_loop(), self._bulk_fd)
                return super().open(*args, **kwargs)

            _bulk_fd = None

            def on_close(self):
                if self._bulk_fd is not None:
                    fairselect.unmark_bulk(asyncio.get_running_loop(), self._bulk_fd)
                    self._bulk_fd = None
                super().on_close()

            def get_websocket_protocol(self):
                # Tornado's protocol with frames read from callbacks: the
                # upgrade request's handling ends once the websocket is open
                # instead of lasting as long as it (chatd.wsframes).
                if self.request.headers.get("Sec-WebSocket-Version") != "13":
                    return None
                params = tornado.websocket._WebSocketParams(
                    ping_interval=self.ping_interval,
                    ping_timeout=self.ping_timeout,
                    max_message_size=self.max_message_size,
                    compression_options=self.get_compression_options(),
                )
                return wsframes.EventWebSocketProtocol(self, False, params)

            def served(self):
                # Called once engine.io has taken the websocket over
                # (chatd.delivery.DirectSocket): what only the upgrade request
                # needed goes. Tornado keeps the request's parsed headers twice
                # (the request's and its connection's), and the 101's own.
                self.request.headers = HTTPHeaders()
                conn = self.request.connection
                if getattr(conn, "_request_headers", None) is not None:
                    conn._request_headers = None
                self._headers = HTTPHeaders()
                # The stream's two deques (pending writes, their futures) are
                # ~0.7 KB each even when empty, for a connection that mostly
                # writes nothing: _SmallDeque is ~0.1 KB. (Tornado internals:
                # IOStream._write_futures, _StreamBuffer._buffers and
                # HTTP1Connection._request_headers; tests/test_websocket_transport.py
                # and every websocket test run through them.)
                stream = getattr(self.ws_connection, "stream", None)
                if stream is not None:
                    stream._write_futures = _SmallDeque(stream._write_futures)
                    buffer = stream._write_buffer
                    buffer._buffers = _SmallDeque(buffer._buffers)

            def on_message(self, message):
                # engine.io's on_message is a coroutine, which Tornado runs in
                # a Task of its own per frame received; queueing never waits.
                self.receive_queue.put_nowait(message)

            def get_compression_options(self):
                # permessage-deflate keeps a zlib stream per connection (~150 KB
                # each) and costs CPU on every frame; off unless WS_COMPRESSION.
                return {} if compression else None

            def write_message(self, message, binary=False):
                # Tornado wraps every frame in a Task only to translate the
                # error of a future that engine.io never awaits: one Task per
                # socket per event under fanout. Frame and write directly; a
                # write to a closed stream still raises WebSocketClosedError.
                conn = self.ws_connection
                if conn is None or conn.is_closing() or conn._compressor is not None:
                    return super().write_message(message, binary)
                data = message.encode() if isinstance(message, str) else message
                conn._message_bytes_out += len(data)
                stream = conn.stream
                if type(stream) is tornado.iostream.IOStream and not stream._write_buffer:
                    # Nothing queued before it (so the order holds) and no TLS
                    # layer: straight to the socket. IOStream.write's future,
                    # its done-callback (a loop callback per frame) and buffer
                    # bookkeeping were half the CPU of a fanout delivery.
                    frame = _ws_frame(0x82 if binary else 0x81, data)
                    conn._wire_bytes_out += len(frame)
                    try:
                        sent = stream.socket.send(frame)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except (OSError, AttributeError):
                        sent = 0  # lost or closed: IOStream's write below says how
                    if sent == len(frame):
                        return None
                    try:
                        return stream.write(frame[sent:] if sent else frame)
                    except tornado.iostream.StreamClosedError:
                        raise tornado.websocket.WebSocketClosedError() from None
                try:
                    return conn._write_frame(True, 0x2 if binary else 0x1, data)
                except tornado.iostream.StreamClosedError:
                    raise tornado.websocket.WebSocketClosedError() from None

            async def post(self, *args, **kwargs):
                # A long-polling POST over the packet cap: engine.io would close
                # the session and wait for the client's next poll before
                # answering, so the request hung for the ping timeout. Refuse it
                # at once, as REST refuses an oversized body.
                if len(self.request.body) > realtime.MAX_PACKET:
                    self.set_status(413)
                    self.set_header("Content-Type", "application/json; charset=utf-8")
                    self.finish(b'{"error":{"code":"payload_too_large","message":'
                                b'"Socket.IO packet larger than 64 KiB"}}')  # fmt: skip
                    return
                await super().post(*args, **kwargs)

            def write(self, chunk):
                # engine.io answers protocol errors (unknown session, transport
                # or protocol version, refused origin) as text/plain; API.md
                # gives every non-2xx answer the JSON error shape.
                status = self.get_status()
                if status >= 400 and isinstance(chunk, bytes) and not chunk.startswith(b'{"error"'):
                    self.set_header("Content-Type", web.JSON_TYPE)
                    chunk = orjson.dumps(_engineio_error(status, chunk))
                return super().write(chunk)

        return SocketHandler

    async def readiness(self) -> list[str]:
        """The stores that do not answer (empty when ready). The embedded
        servers are also asked whether their processes and sockets are still
        there: a pool's open connection can answer after the server's socket
        file is gone, when no new connection could be made."""
        down = list(self.servers.down()) if self.servers is not None else []

        async def pg():
            if "postgres" in down:
                return
            try:
                await asyncio.wait_for(self.storage.ping(), self.settings.db_timeout)
            except (TimeoutError, Unavailable):
                down.append("postgres")

        async def rd():
            if self.redis is None or "redis" in down:
                return
            try:
                # Through the Batcher: bounded by REDIS_TIMEOUT, and at once
                # while the shared breaker is open (chatd.redishealth).
                await cache.ping(self.redis)
            except Exception:
                down.append("redis")

        await asyncio.gather(pg(), rd())
        return sorted(down)

    async def stop(self) -> None:
        """Drain and close (see the module docstring for the order)."""
        timeout = self.settings.shutdown_timeout
        deadline = time.monotonic() + timeout
        if self.http is not None:
            self.http.stop()  # closes the listening sockets only
        if self.ctx is not None:
            self.ctx.inflight.draining = True
        if self.presence is not None:
            await self.presence.close()  # goodbye: our users offline now, not after the TTL
        if self.sio is not None:
            sockets = len(self.sio.eio.sockets)
            try:
                # Transport-level close: clients reconnect (to another process).
                await asyncio.wait_for(_close_for_reconnect(self.sio), max(timeout, 1.0))
                await self.sio.shutdown()
                await self.sio.manager.close()
            except Exception:  # pragma: no cover - best effort at exit
                log.warning("closing the Socket.IO connections failed", exc_info=True)
            if sockets:
                log.info("closed %d socket(s) so that they reconnect elsewhere", sockets)
        if self.ctx is not None:
            left = self.ctx.inflight.count
            if left:
                log.info("waiting up to %.1fs for %d request(s) in flight", timeout, left)
            if not await self.ctx.inflight.wait_idle(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "%d request(s) still in flight after %ss: closing their connections",
                    self.ctx.inflight.count,
                    timeout,
                )
        if self.http is not None:
            try:
                await asyncio.wait_for(self.http.close_all_connections(), 5.0)
            except TimeoutError:
                log.warning("connections still open at exit")
        if self.domain is not None:
            await self.domain.drain()
        if self.storage is not None:
            await self.storage.close()
        if self.redis is not None:
            await cache.disconnect(self.redis)


async def _close_for_reconnect(sio: socketio.AsyncServer) -> None:
    """Close every Engine.IO connection so that its client reconnects.

    ``eio.disconnect()`` would first send an Engine.IO CLOSE packet, which
    clients take as "the server is done with me" (python-socketio does not
    reconnect after it). Closing the transport itself instead, a websocket
    close frame or the end of a poll, is a "transport close", after which
    socket.io-client and python-socketio both reconnect, through the load
    balancer to a process that is still up. The server-side disconnect
    handlers run as for any disconnect."""
    for sid, eio_socket in list(sio.eio.sockets.items()):
        try:
            await eio_socket.close(wait=False, abort=True)  # handlers; no CLOSE packet
            await eio_socket.queue.put(None)  # the writer ends and closes the transport
        except Exception:  # pragma: no cover - a socket already going away
            log.debug("closing socket %s", sid, exc_info=True)
        sio.eio.sockets.pop(sid, None)


def _engineio_error(status: int, body: bytes) -> dict:
    try:
        message = orjson.loads(body)  # engine.io sends a JSON string
    except orjson.JSONDecodeError:
        message = body.decode("utf-8", "replace")
    if not isinstance(message, str) or not message:
        message = "bad Socket.IO request"
    code = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
            413: "payload_too_large"}.get(status)  # fmt: skip
    if code is None:
        code = "validation_error" if status < 500 else "unavailable"
    return {"error": {"code": code, "message": message}}


def _ws_frame(first: int, data: bytes) -> bytes:
    """An unmasked server websocket frame: FIN + opcode byte, length, payload
    (RFC 6455 5.2, as Tornado's WebSocketProtocol13._write_frame makes it)."""
    n = len(data)
    if n < 126:
        return bytes((first, n)) + data
    if n <= 0xFFFF:
        return bytes((first, 126)) + n.to_bytes(2, "big") + data
    return bytes((first, 127)) + n.to_bytes(8, "big") + data


class _SmallDeque(list):
    """The part of collections.deque a Tornado stream's write queues use
    (append, popleft, [0], [-1], len, iteration, clear), on a list: an empty
    deque allocates a 64-slot block (~0.7 KB), an empty list nothing. Every
    operation but popleft is the list's own (C) one; a class of its own with
    a head index made popleft O(1) but cost ~0.6 us more per frame written
    (~2% of a fanout delivery), this ~0.1 us. popleft is a list's pop(0):
    linear in the backlog, which only a client that stops reading builds (a
    10,000-frame backlog drains in ~9 ms of CPU in all; one that reads
    nothing is closed by the ping timeout first)."""

    __slots__ = ()

    def popleft(self):
        return self.pop(0)


class _Inbox:
    """Incoming websocket frames, in order, for engine.io's reader (the part of
    asyncio.Queue it uses: put, put_nowait, get), until the engine.io socket
    takes them from a callback (``sink``, set by chatd.delivery.DirectSocket
    once the websocket is its transport): then each frame, and the ``None``
    that ends the connection, go to the sink as they arrive."""

    __slots__ = ("_items", "_waiter", "sink")

    def __init__(self):
        self._items: list = []
        self._waiter: asyncio.Future | None = None
        self.sink = None

    def take(self) -> list:
        """What arrived and was not read yet (the sink gets the rest)."""
        items, self._items = self._items, []
        return items

    def put_nowait(self, item) -> None:
        sink = self.sink
        if sink is not None:
            sink(item)
            return
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def put(self, item) -> None:
        self.put_nowait(item)

    async def get(self):
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class HTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server with chatd's connections (chatd.httpconn: keep-alive
    after early answers, JSON answers to malformed requests, 408/414/431) and
    TCP_NODELAY on for each connection's life.

    Tornado turns Nagle's algorithm off to finish every response and back on
    after it: two setsockopt() calls per request (~2.5% of a history read).
    chatd writes each answer in one piece and its websockets want no delay
    anyway, so it is set once at accept and left alone."""

    def handle_stream(self, stream, address) -> None:
        stream.set_nodelay(True)
        stream.set_nodelay = _nodelay_stays_on
        # Tornado's handle_stream, with chatd's connection class.
        context = httpconn.RequestContext(stream, address, self.protocol, self.trusted_downstream)
        ctx = getattr(self.request_callback, "settings", {}).get("chatd_ctx")
        context.chatd_cors = ctx.cors_origins if ctx is not None else ()
        conn = httpconn.ServerConnection(stream, self.conn_params, context)
        self._connections.add(conn)
        conn.start_serving(self)


def _nodelay_stays_on(value: bool) -> None:
    pass


def bind(settings: config.Settings, reuse_port: bool = False) -> list:
    """The listening sockets; a port that cannot be had is a ConfigError (one line)."""
    try:
        return tornado.netutil.bind_sockets(
            settings.port, settings.host or None, family=socket.AF_UNSPEC, reuse_port=reuse_port
        )
    except OSError as exc:
        where = f"{settings.host}:{settings.port}" if settings.host else f"port {settings.port}"
        if exc.errno == errno.EADDRINUSE:
            why = "something else listens there (another chatd?): stop it or set CHATPORT"
        elif exc.errno == errno.EACCES:
            why = "permission denied (ports below 1024 need privileges): set CHATPORT"
        else:
            why = exc.strerror or str(exc)
        raise config.ConfigError(f"cannot listen on {where}: {why}") from None


def origins_line(origins: tuple[str, ...]) -> str:
    """What the start-up log says about FRONTENDADDRES."""
    if not origins:
        return (
            "cross-origin browsers: none allowed (FRONTENDADDRES is empty; "
            "same-origin and non-browser clients are fine)"
        )
    if "*" in origins:
        return "cross-origin browsers: any origin allowed (FRONTENDADDRES=*)"
    return f"cross-origin browsers allowed (FRONTENDADDRES): {', '.join(origins)}"


def tune_gc() -> None:
    """Once start-up is done: move everything alive now (modules, the app, the
    pools) out of the collector's sight, and collect the young generation less
    often. Chat traffic makes many short-lived objects; with the defaults the
    full collections that walk every long-lived object showed as ~50 ms pauses
    under fanout load."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def run(coro) -> None:
    """Run chatd's event loop: asyncio's own. uvloop was measured here (+4-7%
    on the REST scenarios) and dropped, twice: on top of aiopg, a PostgreSQL
    connection reset can leave libuv watching a descriptor that libpq has
    already closed, and libuv then aborts the whole process
    (docs/PERFORMANCE.md, "uvloop")."""
    log.debug("event loop: asyncio's own, with chatd.fairselect's selector")
    # asyncio.run() with the loop built on FairSelector: a storm of websocket
    # events (10,000 ends at once) is handled over many turns, requests first.
    with asyncio.Runner(loop_factory=fairselect.new_loop) as runner:
        runner.run(coro)


def check_schema(settings: config.Settings) -> None:
    pend = migrations.pending(settings.database_url)
    if pend:
        raise config.ConfigError(
            f"the database schema is not up to date ({len(pend)} pending: {pend[0]}...): "
            "run `chatctl migrate`"
        )


async def _watchdog(interval: float) -> None:
    while True:
        sdnotify.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def serve(
    settings: config.Settings,
    hint: str | None = None,
    sockets: list | None = None,
    servers: embedded.EmbeddedServers | None = None,
) -> None:
    daemon = Chatd(settings, sockets, servers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            return
        received.append(sig.name)
        sdnotify.notify("STOPPING=1")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    watchdog = None
    try:
        await daemon.start()
        if hint:
            log.info("%s", hint)
        log.info("%s", origins_line(settings.cors_origins))
        sdnotify.notify(f"READY=1\nSTATUS=listening on port {daemon.port}")
        tune_gc()
        interval = sdnotify.watchdog_interval()
        if interval:
            watchdog = asyncio.ensure_future(_watchdog(interval))
        await stop.wait()
        log.info("stopping (%s)", received[0] if received else "stop")
    finally:
        if watchdog is not None:
            watchdog.cancel()
        await daemon.stop()
    log.info("stopped")


def _token_hint(settings: config.Settings) -> str:
    where = ""
    if settings.data_dir and embedded.Path(settings.data_dir) != embedded.default_data_dir():
        where = f"CHATD_DATA_DIR={settings.data_dir} "
    chatctl = "chatctl"
    beside = embedded.Path(sys.executable).parent / "chatctl"
    if shutil.which("chatctl") is None and beside.is_file():
        chatctl = str(beside)  # not on PATH (e.g. started by scripts/run.sh)
    return f"get an access token with: {where}{chatctl} token USER"


class _StopStarting(BaseException):
    """SIGTERM before the event loop runs (during the embedded start-up)."""


def _stop_starting(signum, frame) -> None:
    raise _StopStarting


USAGE = """\
Usage: chatd [--help]

chatd serves the chat REST API and Socket.IO on one port (CHATPORT, default
8080) and runs in the foreground until SIGTERM or Ctrl-C, which drain it.

Every setting comes from the environment or a .env file in the working
directory (CHATD_ENV_FILE names another); .env.example lists them all:
  CHATPORT, CHATD_HOST        where to listen (default: every address, port 8080)
  FRONTENDADDRES              browser origins allowed, e.g. http://localhost:3000
  DATABASE_URL or DB_*        PostgreSQL; REDIS_URL or REDIS_*: Redis
  ACCESS_TOKEN_SECRET         the HS256 secret tokens are signed with
  LOG_LEVEL, LOG_FORMAT       debug|info|warning|error, text|json
  CHATD_CONSOLE               the web console at / (on|off, default on)

With no database configured chatd runs its own PostgreSQL and Redis (the
embedded default), with their data, and a generated token secret, in
CHATD_DATA_DIR (default: {data_dir}). One chatd at a time
owns that folder. `chatctl token USER` mints a token for it.

Exit status: 0 after a clean stop, 2 for a setting, port or data folder that
cannot be used (one line on stderr saying which), 1 when a store fails.
"""


def usage() -> str:
    try:
        where = str(embedded.default_data_dir())
    except Exception:  # pragma: no cover - platformdirs missing
        where = "~/.local/share/chatd"
    return USAGE.format(data_dir=where)


def _fail(code: int, message: object) -> None:
    print(f"chatd: {message}", file=sys.stderr)  # noqa: T201
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in args):
        print(usage(), end="")  # noqa: T201
        sys.exit(0)
    if args:
        _fail(2, f"unexpected argument {args[0]!r}: chatd takes its settings from the "
                 "environment (see chatd --help)")  # fmt: skip
    try:
        settings = config.load()
    except config.ConfigError as exc:
        _fail(2, exc)
    setup_logging(settings)
    servers: embedded.EmbeddedServers | None = None
    hint = None
    lock = None
    sockets = None
    try:
        if settings.database_url is None:
            # The folder is ours before anything is touched: a second chatd on
            # it stops here, having started no server and bound no port.
            lock = embedded.lock_data_dir(embedded.data_dir_of(settings))
        if settings.workers <= 1:
            # Before the embedded servers start: a busy port fails in a moment,
            # not after initdb, and leaves nothing to undo.
            sockets = bind(settings)
        if settings.database_url is None:
            # The embedded default. Started here, before the event loop exists,
            # so initdb and the waits block nothing; stopped after it is gone.
            secret_configured = bool(settings.access_token_secret)
            settings, created = embedded.resolve(settings, create=True)
            # chatd's own secret: the web console may sign in by name (webconsole.py).
            settings = dataclasses.replace(settings, own_secret=not secret_configured)
            setup_logging(settings)  # again: now it knows the embedded secret, to mask it
            layout = embedded.Layout(embedded.Path(settings.data_dir))
            # A configured REDIS_URL is used as it is; otherwise Redis is embedded too.
            servers = embedded.EmbeddedServers(
                layout.root,
                with_redis=settings.redis_url == layout.redis_url,
                user=settings.embedded_user,
            )
            if not secret_configured:  # the data folder's secret: chatctl finds it there
                hint = _token_hint(settings)
                if created:
                    hint += f" (new secret in {servers.layout.secret_file}, mode 0600)"
            sdnotify.notify("STATUS=starting the embedded PostgreSQL and Redis")
            # Until the event loop takes over SIGTERM, it stops the start-up
            # cleanly: start() stops what it started, and main() exits 0.
            signal.signal(signal.SIGTERM, _stop_starting)
            servers.start()
        else:
            check_schema(settings)
        if settings.workers > 1:
            from .workers import supervise

            # Each worker binds its own socket with SO_REUSEPORT and the kernel
            # spreads connections over them. (One inherited socket would not:
            # the worker that wakes first accepts a whole burst of them.) Port
            # 0 is resolved once here so that every worker binds the same one.
            # The probe also fails here, once and in one line, on a busy port.
            probe = bind(settings, reuse_port=True)
            settings = dataclasses.replace(settings, port=probe[0].getsockname()[1])
            for s in probe:
                s.close()
            shared = settings
            sys.exit(
                supervise(
                    settings.workers,
                    lambda: run(serve(shared, hint, bind(shared, reuse_port=True), servers)),
                )
            )
        run(serve(settings, hint, sockets, servers))
    except (config.ConfigError, embedded.DataDirInUse) as exc:
        _fail(2, exc)
    except (Unavailable, migrations.MigrationError, embedded.EmbeddedError) as exc:
        _fail(1, exc)
    except (KeyboardInterrupt, _StopStarting):
        log.info("stopped during start-up")
    finally:
        for sock in sockets or ():
            sock.close()
        if servers is not None:
            servers.stop()
            log.info("embedded PostgreSQL and Redis stopped")
        if lock is not None:
            os.close(lock)  # after the servers are down: the folder is free again
