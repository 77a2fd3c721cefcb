"""chatctl: administer chatd (migrations, seed data, live tail, cache, tokens, ...).

Reads the same configuration as chatd: the environment, then ``.env`` (or
``--env-file``). Exit codes: 0 success, 1 operational failure, 2 usage error.
Errors are one line on stderr; ``--debug`` shows the traceback instead.

Each subcommand lives in its own module; the group's context object
(:class:`cli.context.Ctx`) owns the settings and every connection.
"""

from __future__ import annotations

import sys

import click

from . import cache, chats, check, export, migrate, seed, tail, token
from .context import Ctx, Failure

__all__ = ["Failure", "cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--env-file", type=click.Path(dir_okay=False), help="Read settings from this file.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, env_file: str | None, debug: bool) -> None:
    """Administer chatd.

    \b
    Example:
      chatctl migrate --status
      chatctl --env-file /etc/chatd.env check
    """
    ctx.obj = Ctx(ctx, env_file, debug)


for command in (
    migrate.migrate,
    token.token,
    seed.seed,
    tail.tail,
    cache.cache,
    check.check,
    chats.chats,
    export.export,
):
    cli.add_command(command)


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        rc = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.UsageError as exc:
        if debug:
            raise
        # One line, like every other error; the command's --help is named.
        where = exc.ctx.command_path if exc.ctx else "chatctl"
        click.echo(f"Error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        if debug:
            raise
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    # Without standalone mode, click returns the code of ctx.exit(n) / Exit(n).
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
