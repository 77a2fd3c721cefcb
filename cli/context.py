"""The context object of ``chatctl``: settings, connections and the event loop.

One :class:`Ctx` per invocation, made by the ``chatctl`` group and handed to
every subcommand (``@pass_ctx``). It opens what a command asks for, lazily
(a command that needs only PostgreSQL never connects to Redis), and registers
each resource with the click context (``with_resource`` / ``call_on_close``),
so everything is closed when the command ends, whether it succeeded, failed or
was interrupted.

Async work runs on one ``asyncio.Runner`` owned by the context: the aiopg pool
and the Redis clients are bound to its loop, so they are opened and closed on
the same loop however many ``ctx.run()`` calls a command makes.

Errors: configuration problems are usage errors (exit 2); a store that does not
answer, or a rule of the domain that refuses, is a :class:`Failure` (exit 1).
Both are one line on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

import click
import psycopg2
from redis.exceptions import RedisError

from chatd import cache, config, embedded
from chatd.errors import ApiError, Unavailable

T = TypeVar("T")


class Failure(click.ClickException):
    """An operational failure: one line on stderr, exit 1."""

    exit_code = 1


class Ctx:
    def __init__(self, click_ctx: click.Context, env_file: str | None, debug: bool):
        self._click = click_ctx
        self.env_file = env_file
        self.debug = debug
        self._settings: config.Settings | None = None
        self.embedded = False  # no database configured: chatd's embedded one
        self._runner: asyncio.Runner | None = None
        self._storage = None
        self._redis = None
        self._events = None

    # -- settings -----------------------------------------------------------

    def resolve_settings(self) -> config.Settings:
        """The effective settings: the ONE place chatctl reads configuration.

        The environment, then ``.env`` (or ``--env-file``), exactly as chatd
        reads them; with no database configured, the embedded default's URLs
        and secret from the same data folder chatd uses (chatd.embedded), so
        every subcommand works against it too.
        """
        configured = config.load(env_file=self.env_file)
        self.embedded = configured.database_url is None
        settings, _ = embedded.resolve(configured)
        return settings

    @property
    def settings(self) -> config.Settings:
        if self._settings is None:
            try:
                self._settings = self.resolve_settings()
            except config.ConfigError as exc:
                raise click.UsageError(str(exc)) from None
        return self._settings

    def database_url(self) -> str:
        url = self.settings.database_url
        if url is None:
            raise click.UsageError("no database configured: set DATABASE_URL (or DB_HOST, ...)")
        if self.embedded:
            layout = embedded.Layout(embedded.Path(self.settings.data_dir))
            socket = layout.pg_socket_dir / f".s.PGSQL.{embedded.PG_PORT}"
            if not socket.exists():
                raise Failure(
                    "no database configured, and chatd's embedded PostgreSQL in "
                    f"{layout.root} is not running: start chatd (it starts it), "
                    "or set DATABASE_URL"
                )
        return url

    def redis_url(self) -> str:
        url = self.settings.redis_url
        if url is None:
            raise click.UsageError("no Redis configured: set REDIS_URL (or REDIS_HOST, ...)")
        return url

    # -- the event loop -------------------------------------------------------

    def _loop(self) -> asyncio.Runner:
        # Registered before any resource of the loop, so it is closed after them.
        if self._runner is None:
            self._runner = self._click.with_resource(asyncio.Runner())
        return self._runner

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the context's loop, turning store and domain errors
        into one-line failures."""
        runner = self._loop()
        try:
            return runner.run(coro)
        except Unavailable as exc:
            raise Failure(exc.message) from None
        except ApiError as exc:
            raise Failure(exc.message) from None
        except RedisError as exc:
            raise Failure(f"Redis is unavailable: {_first_line(exc)}") from None
        except psycopg2.Error as exc:
            raise Failure(f"PostgreSQL failed: {_first_line(exc)}") from None

    def _close_later(self, close) -> None:
        """Close a resource of the loop when the command ends (before the loop)."""
        runner = self._loop()

        def closer() -> None:
            with contextlib.suppress(Exception):
                runner.run(close())

        self._click.call_on_close(closer)

    # -- connections ------------------------------------------------------------

    def storage(self):
        """chatd's Storage (an aiopg pool), opened on first use."""
        if self._storage is None:
            from chatd.storage import Storage

            s = self.settings
            dsn = self.database_url()
            # A CLI needs a handful of connections, not the server's pool size.
            self._storage = self.run(Storage.connect(dsn, min(4, s.db_pool_size), s.db_timeout))
            self._storage.search_config = s.search_language
            self._close_later(self._storage.close)
        return self._storage

    def redis(self):
        """An asyncio Redis client bounded by REDIS_TIMEOUT, or None without Redis."""
        if self._redis is None and self.settings.redis_url:
            self._redis = cache.connect(self.settings.redis_url, self.settings.redis_timeout)
            self._close_later(self._redis.aclose)
        return self._redis

    def page_cache(self) -> cache.PageCache:
        s = self.settings
        return cache.PageCache(self.redis(), s.redis_prefix, s.cache_rows, s.cache_ttl)

    def events(self):
        """Where the domain's events go: every chatd process's sockets (through
        the Socket.IO Redis channel) when Redis is configured, else nowhere."""
        if self._events is None:
            s = self.settings
            if s.redis_url and self._redis_answers():
                from chatd.emitter import RedisEmitter

                self._events = RedisEmitter(s.redis_url, s.socketio_channel, s.redis_timeout)
                self._close_later(self._events.close)
            else:
                if s.redis_url:
                    # As in chatd, Redis trouble does not stop a write (PostgreSQL
                    # is the truth); say so once instead of once per event.
                    click.echo(
                        "warning: Redis does not answer: running chatd processes will not "
                        "get these events (clients catch up by seq)",
                        err=True,
                    )
                from chatd.events import NullEvents

                self._events = NullEvents()
        return self._events

    def _redis_answers(self) -> bool:
        client = self.redis()
        try:
            self._loop().run(asyncio.wait_for(client.ping(), self.settings.redis_timeout))
        except (RedisError, OSError, TimeoutError):
            return False
        return True

    def domain(self):
        """chatd's ChatService, so chatctl follows the same rules as REST and sockets."""
        from chatd.domain import ChatService

        service = ChatService(
            self.storage(), self.page_cache(), self.events(), self.settings.max_message_length
        )
        self._close_later(service.drain)
        return service


pass_ctx = click.make_pass_decorator(Ctx)


def format_option(help: str):
    """The ``--format text|json`` option (passed as ``fmt``) of the commands that print."""
    return click.option(
        "--format", "fmt", type=click.Choice(["text", "json"]), default="text",
        show_default=True, help=help,
    )  # fmt: skip


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
