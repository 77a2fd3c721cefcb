"""chatctl: administer chatd (migrations, tokens, ...).

Reads the same configuration as chatd: the environment, then ``.env`` (or
``--env-file``). Exit codes: 0 success, 1 operational failure, 2 usage error.
"""

from __future__ import annotations

import sys

import click

from chatd import config, embedded, migrations


class Ctx:
    def __init__(self, env_file: str | None, debug: bool):
        self.env_file = env_file
        self.debug = debug
        self._settings: config.Settings | None = None

    @property
    def settings(self) -> config.Settings:
        if self._settings is None:
            try:
                settings = config.load(env_file=self.env_file)
            except config.ConfigError as exc:
                raise click.UsageError(str(exc)) from None
            # No database configured: the embedded default's URLs and secret,
            # from the same data folder chatd uses (chatd.embedded).
            self._settings, _ = embedded.resolve(settings)
        return self._settings

    def database_url(self) -> str:
        url = self.settings.database_url
        if url is None:
            raise click.UsageError("no database configured: set DATABASE_URL (or DB_HOST, ...)")
        return url


class Failure(click.ClickException):
    """An operational failure: one line on stderr, exit 1."""

    exit_code = 1


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--env-file", type=click.Path(dir_okay=False), help="Read settings from this file.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, env_file: str | None, debug: bool) -> None:
    """Administer chatd.

    \b
    Example:
      chatctl migrate --status
    """
    ctx.obj = Ctx(env_file, debug)


@cli.command()
@click.option("--dry-run", is_flag=True, help="List what would be applied; change nothing.")
@click.option("--status", "show_status", is_flag=True, help="List applied and pending files.")
@click.pass_obj
def migrate(obj: Ctx, dry_run: bool, show_status: bool) -> None:
    """Apply the pending SQL migrations of sql/, in order, each once.

    \b
    Example:
      DATABASE_URL=postgresql://chatd@127.0.0.1/chatd chatctl migrate
    """
    dsn = obj.database_url()
    try:
        if show_status:
            states = migrations.status(dsn)
            for st in states:
                when = f"  {st.applied_at}" if st.applied_at else ""
                click.echo(f"{st.status:8} {st.name}{when}")
            bad = [s.name for s in states if s.status == "changed"]
            if bad:
                raise Failure(f"{bad[0]} was changed after it was applied")
            return
        done = migrations.migrate(dsn, dry_run=dry_run, say=click.echo)
    except migrations.MigrationError as exc:
        raise Failure(str(exc)) from None
    if not done:
        click.echo("nothing to apply: the schema is up to date")
    elif not dry_run:
        click.echo(f"applied {len(done)} migration(s)")


@cli.command()
@click.argument("user")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime: 30s, 15m, 1h, 7d.")
@click.option("--claim", "claims", multiple=True, metavar="K=V", help="Extra claim (repeatable).")
@click.pass_obj
def token(obj: Ctx, user: str, ttl: str, claims: tuple[str, ...]) -> None:
    """Mint an access token for USER with the configured ACCESS_TOKEN_SECRET.

    \b
    Example:
      curl -H "Authorization: Bearer $(chatctl token alice)" localhost:8080/chats
    """
    from chatd.auth import mint

    secret = obj.settings.access_token_secret
    if not secret:
        raise click.UsageError(
            "ACCESS_TOKEN_SECRET is not set, and there is no embedded chatd secret in "
            f"{embedded.data_dir_of(obj.settings)} (start chatd once, or set CHATD_DATA_DIR)"
        )
    seconds = _duration(ttl)
    extra = {}
    for item in claims:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not K=V", param_hint="--claim")
        extra[key] = value
    if obj.settings.jwt_audience and "aud" not in extra:
        extra["aud"] = obj.settings.jwt_audience
    if obj.settings.jwt_issuer and "iss" not in extra:
        extra["iss"] = obj.settings.jwt_issuer
    click.echo(mint(secret, user, seconds, extra))


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit.isdigit():
        number, unit = text, "s"
    if not number.isdigit() or unit not in units or int(number) <= 0:
        raise click.BadParameter(f"{text!r} is not a duration like 30s, 15m, 1h or 7d")
    return int(number) * units[unit]


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
