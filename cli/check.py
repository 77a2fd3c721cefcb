"""chatctl check: is this deployment ready to serve?"""

from __future__ import annotations

import asyncio
import os
import socket

import click

from chatd import config, embedded, migrations

from .context import Ctx, pass_ctx


@click.command()
@pass_ctx
def check(obj: Ctx) -> None:
    """Check the configuration, PostgreSQL, Redis and the schema.

    Prints one line per check, "ok" or "FAIL" with the detail, and exits 1 if
    any check fails (so it fits a deploy script or a readiness probe).

    On the embedded default (no database configured) with no chatd running,
    the stores do not exist yet (chatd starts them): it checks what chatd
    needs to start instead (the data folder, the PostgreSQL and Redis
    binaries, the token secret, the port) and passes when chatd would start.
    With chatd running, it checks its live stores.

    \b
    Example:
      chatctl check && chatd
    """
    failed = False

    def line(ok: bool, name: str, detail: str) -> None:
        nonlocal failed
        failed = failed or not ok
        click.echo(f"{'ok' if ok else 'FAIL':4}  {name:10} {detail}")

    try:
        settings = obj.settings
    except click.UsageError as exc:
        line(False, "config", exc.message)
        raise click.exceptions.Exit(1) from None
    red = settings.redacted()
    if obj.embedded:
        root = embedded.Path(settings.data_dir)
        owner = embedded.data_dir_owner(root)
        if owner is None:
            # chatd is not running: its stores start with it. Check what chatd
            # needs to start them, and pass when it would start.
            _check_embedded_start(obj, settings, line)
            if failed:
                raise click.exceptions.Exit(1)
            return
        line(True, "config", f"embedded default in {root}, run by chatd (pid {owner})")
    elif settings.database_url is None:
        line(False, "config", "no database configured: set DATABASE_URL (or DB_HOST, ...)")
    else:
        line(
            True,
            "config",
            f"database {red['database_url']}, redis {red['redis_url'] or '-'}, "
            f"prefix {settings.redis_prefix}",
        )

    pg_ok = False
    if settings.database_url is not None:
        try:
            storage = obj.storage()
            obj.run(asyncio.wait_for(storage.ping(), settings.db_timeout))
            line(True, "postgres", f"reachable ({config.database_name(settings.database_url)})")
            pg_ok = True
        except (click.ClickException, TimeoutError) as exc:
            line(False, "postgres", _msg(exc) or "no answer")
    else:
        line(False, "postgres", "not configured")

    if settings.redis_url is None:
        line(True, "redis", "not configured (one process, no page cache)")
    else:
        try:
            client = obj.redis()
            obj.run(asyncio.wait_for(client.ping(), settings.redis_timeout))
            line(True, "redis", "reachable")
        except (click.ClickException, TimeoutError) as exc:
            line(False, "redis", _msg(exc) or "no answer")

    if pg_ok:
        try:
            states = migrations.status(settings.database_url)
        except migrations.MigrationError as exc:
            line(False, "schema", str(exc))
        else:
            pend = [s.name for s in states if s.status == "pending"]
            bad = [s.name for s in states if s.status in ("changed", "missing")]
            if bad:
                line(False, "schema", f"{bad[0]} was changed or removed after it was applied")
            elif pend:
                line(False, "schema", f"{len(pend)} pending migration(s): run `chatctl migrate`")
            else:
                line(True, "schema", f"up to date ({len(states)} migration(s) applied)")
    else:
        line(False, "schema", "not checked (PostgreSQL unavailable)")

    if failed:
        raise click.exceptions.Exit(1)


def _msg(exc: BaseException) -> str:
    if isinstance(exc, click.ClickException):
        return exc.message
    return str(exc)


def _check_embedded_start(obj: Ctx, settings: config.Settings, line) -> None:
    """What chatd needs to start on the embedded default, checked without
    starting anything or writing anything."""
    root = embedded.Path(settings.data_dir)
    line(True, "config", f"embedded default in {root} (chatd starts PostgreSQL and Redis)")

    # The data folder: writable, or creatable under its nearest existing parent.
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        line(False, "data", f"{existing} is not a folder")
    elif not os.access(existing, os.W_OK | os.X_OK):
        line(False, "data", f"{existing} is not writable by this user")
    else:
        line(True, "data", f"{root} {'writable' if existing == root else 'can be created'}")

    try:
        pg = embedded.pg_bin_dir() / "postgres"
        rs = embedded.redis_server_bin()
    except embedded.EmbeddedError as exc:
        line(False, "binaries", str(exc))
    else:
        missing = [str(p) for p in (pg, rs) if not os.access(p, os.X_OK)]
        if missing:
            line(False, "binaries", f"missing: {', '.join(missing)} (reinstall chatd)")
        else:
            line(True, "binaries", "PostgreSQL and redis-server present")

    if settings.access_token_secret:
        from_file = embedded.read_secret(embedded.Layout(root)) == settings.access_token_secret
        line(
            True,
            "secret",
            f"from {root / embedded.SECRET_FILE if from_file else 'ACCESS_TOKEN_SECRET'}",
        )
    else:
        line(True, "secret", f"chatd creates one in {root / embedded.SECRET_FILE} at start")

    line(*_port_free(settings))
    line(True, "schema", "chatd migrates its embedded database at start")


def _port_free(settings: config.Settings) -> tuple[bool, str, str]:
    host = settings.host or None
    try:
        infos = socket.getaddrinfo(host, settings.port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   0, socket.AI_PASSIVE)  # fmt: skip
    except OSError as exc:
        return False, "port", f"cannot resolve CHATD_HOST {settings.host!r}: {exc}"
    for family, kind, proto, _name, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                return False, "port", f"{settings.port} is not free ({exc.strerror}): set CHATPORT"
    return True, "port", f"{settings.port} free"
