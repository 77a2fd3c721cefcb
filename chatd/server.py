"""The chatd daemon: configuration, the stores, one Tornado app with the REST
API and Socket.IO on one port, and an orderly stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

import socketio
import tornado.httpserver
import tornado.web

from . import cache, config, limits, migrations, pubsub, realtime, web
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

    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.storage: Storage | None = None
        self.redis = None
        self.sio: socketio.AsyncServer | None = None
        self.domain: ChatService | None = None
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
        manager = None
        if s.redis_url:
            # Emits go through Redis to every chatd process sharing it, so a
            # room's sockets get an event wherever they are connected.
            manager = pubsub.BoundedRedisManager(
                s.redis_url,
                channel=s.socketio_channel,
                json=realtime.OrjsonPackets,
                redis_options={
                    "socket_connect_timeout": s.redis_timeout,
                    "retry": cache.no_retry(),
                },
                publish_timeout=s.redis_timeout,
            )
        self.sio = realtime.create_server(s.cors_origins, manager)
        events = realtime.SocketEvents(self.sio)
        limiter = limits.RateLimiter(
            self.redis,
            s.redis_prefix,
            {limits.SENDS: s.rate_limit_sends, limits.EVENTS: s.rate_limit_events},
            timeout=s.redis_timeout,
        )
        self.domain = ChatService(
            self.storage, page_cache, events, s.max_message_length, limiter=limiter
        )
        verifier = TokenVerifier(
            s.access_token_secret, s.jwt_user_claims, s.jwt_audience, s.jwt_issuer
        )
        self.sio.register_namespace(realtime.ChatNamespace(self.domain, verifier))
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
        sockets = tornado.netutil.bind_sockets(s.port, s.host or None, family=socket.AF_UNSPEC)
        self.http.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        scheme = "https" if s.tls else "http"
        log.info("chatd listening on %s://%s:%d", scheme, s.host or "0.0.0.0", self.port)

    def _socket_handler(self) -> type:
        compression = self.settings.ws_compression
        base = socketio.get_tornado_handler(self.sio)

        class SocketHandler(base):
            def get_compression_options(self):
                # permessage-deflate keeps a zlib stream per connection (~150 KB
                # each) and costs CPU on every frame; off unless WS_COMPRESSION.
                return {} if compression else None

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
        if self.sio is not None:
            try:
                await self.sio.shutdown()
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


def check_schema(settings: config.Settings) -> None:
    pend = migrations.pending(settings.database_url)
    if pend:
        raise config.ConfigError(
            f"the database schema is not up to date ({len(pend)} pending: {pend[0]}...): "
            "run `chatctl migrate`"
        )


async def serve(settings: config.Settings) -> None:
    daemon = Chatd(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await daemon.start()
        await stop.wait()
        log.info("stopping")
    finally:
        await daemon.stop()
    log.info("stopped")


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
        asyncio.run(serve(settings))
    except config.ConfigError as exc:
        print(f"chatd: {exc}", file=sys.stderr)  # noqa: T201
        sys.exit(2)
    except (Unavailable, migrations.MigrationError) as exc:
        print(f"chatd: {exc}", file=sys.stderr)  # noqa: T201
        sys.exit(1)
    except KeyboardInterrupt:
        pass
