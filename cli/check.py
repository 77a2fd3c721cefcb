"""chatctl check: is this deployment ready to serve?"""

from __future__ import annotations

import asyncio

import click

from chatd import config, migrations

from .context import Ctx, pass_ctx


@click.command()
@pass_ctx
def check(obj: Ctx) -> None:
    """Check the configuration, PostgreSQL, Redis and the schema.

    Prints one line per check, "ok" or "FAIL" with the detail, and exits 1 if
    any check fails (so it fits a deploy script or a readiness probe).

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
    if settings.database_url is None:
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
