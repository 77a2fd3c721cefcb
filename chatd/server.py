"""The chatd daemon: configuration, the stores, one Tornado app with the REST
API and Socket.IO on one port, and an orderly stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys

import socketio
import tornado.httpserver
import tornado.iostream
import tornado.web
import tornado.websocket

from . import cache, config, migrations, presence, realtime, web
from .auth import TokenVerifier
from .domain import ChatService
from .errors import Unavailable
from .storage import Storage

log = logging.getLogger("chatd")


def setup_logging(settings: config.Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Tornado's access log is replaced by chatd's own request line (web.log_request).
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


class Chatd:
    """One chatd process: start() binds and serves, stop() drains and closes."""

    def __init__(self, settings: config.Settings, sockets: list | None = None):
        self.settings = settings
        self._sockets = sockets  # bound already (CHATD_WORKERS): accept on these
        self.storage: Storage | None = None
        self.redis = None
        self.sio: socketio.AsyncServer | None = None
        self.domain: ChatService | None = None
        self.presence: presence.Presence | presence.LocalPresence | None = None
        self.http: tornado.httpserver.HTTPServer | None = None
        self.port = 0

    async def start(self) -> None:
        s = self.settings
        if s.database_url is None:
            raise config.ConfigError(
                "no database configured: set DATABASE_URL (or DB_HOST, DB_NAME, DB_USER, ...)"
            )
        self.storage = await Storage.connect(s.database_url, s.db_pool_size, s.db_timeout)
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
        events = realtime.SocketEvents(self.sio)
        self.domain = ChatService(
            self.storage,
            page_cache,
            events,
            s.max_message_length,
            gate=presence.Gate(self.redis, s.redis_prefix),
        )
        verifier = TokenVerifier(
            s.access_token_secret, s.jwt_user_claims, s.jwt_audience, s.jwt_issuer
        )
        self.sio.register_namespace(realtime.ChatNamespace(self.domain, verifier, self.presence))
        await self.sio.manager.start(s.redis_timeout + 1)
        await self.presence.start()
        ctx = web.Context(
            domain=self.domain,
            verifier=verifier,
            cors_origins=s.cors_origins,
            readiness=self.readiness,
        )
        app = web.make_app(ctx, self._socket_handler(), log_function=web.log_request)
        ssl_options = None
        if s.tls:
            import ssl

            ssl_options = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_options.load_cert_chain(s.tls_cert_file, s.tls_key_file)
        self.http = tornado.httpserver.HTTPServer(
            app,
            ssl_options=ssl_options,
            xheaders=True,
            # Bodies stream through BaseHandler, which answers 413 past 64 KiB;
            # this only cuts off a client that keeps sending after that.
            max_body_size=1024 * 1024,
            idle_connection_timeout=75,
        )
        sockets = self._sockets or bind(s)
        self.http.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        scheme = "https" if s.tls else "http"
        log.info("chatd listening on %s://%s:%d", scheme, s.host or "0.0.0.0", self.port)

    def _socket_handler(self) -> type:
        compression = self.settings.ws_compression
        base = socketio.get_tornado_handler(self.sio)

        class SocketHandler(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                # engine.io's handler keeps an asyncio.Queue per connection for
                # incoming frames (four deques, ~3 KB); this inbox does the same
                # job in a list and one future.
                self.receive_queue = _Inbox()

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
                try:
                    return conn._write_frame(True, 0x2 if binary else 0x1, data)
                except tornado.iostream.StreamClosedError:
                    raise tornado.websocket.WebSocketClosedError() from None

        return SocketHandler

    async def readiness(self) -> list[str]:
        """The stores that do not answer (empty when ready)."""
        down = []

        async def pg():
            try:
                await asyncio.wait_for(self.storage.ping(), self.settings.db_timeout)
            except (TimeoutError, Unavailable):
                down.append("postgres")

        async def rd():
            if self.redis is None:
                return
            try:
                await asyncio.wait_for(self.redis.ping(), self.settings.redis_timeout)
            except Exception:
                down.append("redis")

        await asyncio.gather(pg(), rd())
        return sorted(down)

    async def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        if self.presence is not None:
            await self.presence.close()  # goodbye: our users offline now, not after the TTL
        if self.sio is not None:
            try:
                await self.sio.shutdown()
                await self.sio.manager.close()
            except Exception:  # pragma: no cover - best effort at exit
                log.debug("socket.io shutdown", exc_info=True)
        if self.http is not None:
            try:
                await asyncio.wait_for(
                    self.http.close_all_connections(), self.settings.shutdown_timeout
                )
            except TimeoutError:
                log.warning("connections still open after %ss", self.settings.shutdown_timeout)
        if self.domain is not None:
            await self.domain.drain()
        if self.storage is not None:
            await self.storage.close()
        if self.redis is not None:
            await self.redis.aclose()


class _Inbox:
    """Incoming websocket frames, in order, for engine.io's reader (the part of
    asyncio.Queue it uses: put, put_nowait, get)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self):
        self._items: list = []
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
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


def bind(settings: config.Settings) -> list:
    return tornado.netutil.bind_sockets(
        settings.port, settings.host or None, family=socket.AF_UNSPEC
    )


def check_schema(settings: config.Settings) -> None:
    pend = migrations.pending(settings.database_url)
    if pend:
        raise config.ConfigError(
            f"the database schema is not up to date ({len(pend)} pending: {pend[0]}...): "
            "run `chatctl migrate`"
        )


def tune_gc() -> None:
    """Once start-up is done: move everything alive now (modules, the app, the
    pools) out of the collector's sight, and collect the young generation less
    often. Chat traffic makes many short-lived objects; with the defaults the
    full collections that walk every long-lived object showed as ~50 ms pauses
    under fanout load."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


async def serve(settings: config.Settings, sockets: list | None = None) -> None:
    daemon = Chatd(settings, sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await daemon.start()
        tune_gc()
        await stop.wait()
        log.info("stopping")
    finally:
        await daemon.stop()
    log.info("stopped")


def run(coro) -> None:
    """Run on uvloop when it is installed (a faster event loop under Tornado,
    which runs on any asyncio loop); CHATD_UVLOOP=0 keeps asyncio's own."""
    if os.environ.get("CHATD_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"chatd: {exc}", file=sys.stderr)  # noqa: T201
        sys.exit(2)
    setup_logging(settings)
    try:
        if settings.database_url is not None:
            check_schema(settings)
        if settings.workers > 1:
            from .workers import supervise

            sockets = bind(settings)
            sys.exit(supervise(settings.workers, sockets, lambda: run(serve(settings, sockets))))
        run(serve(settings))
    except config.ConfigError as exc:
        print(f"chatd: {exc}", file=sys.stderr)  # noqa: T201
        sys.exit(2)
    except (Unavailable, migrations.MigrationError) as exc:
        print(f"chatd: {exc}", file=sys.stderr)  # noqa: T201
        sys.exit(1)
    except KeyboardInterrupt:
        pass
