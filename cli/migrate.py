"""chatctl migrate: apply the schema migrations of sql/."""

from __future__ import annotations

import click

from chatd import migrations

from .context import Ctx, Failure, pass_ctx


@click.command()
@click.option("--dry-run", is_flag=True, help="List what would be applied; change nothing.")
@click.option("--status", "show_status", is_flag=True, help="List applied and pending files.")
@pass_ctx
def migrate(obj: Ctx, dry_run: bool, show_status: bool) -> None:
    """Apply the pending SQL migrations of sql/, in order, each once.

    Safe for two admins at once: runs take a PostgreSQL advisory lock, so the
    second waits for the first and then finds nothing left to do.

    \b
    Example:
      DATABASE_URL=postgresql://chatd@127.0.0.1/chatd chatctl migrate
      chatctl migrate --status
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
