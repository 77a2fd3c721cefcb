"""chatctl cache: chatd's Redis page cache."""

from __future__ import annotations

import click

from chatd import validate
from chatd.errors import BadRequest

from .context import Ctx, pass_ctx


@click.group()
def cache() -> None:
    """chatd's Redis page cache (the newest page of each chat).

    \b
    Example:
      chatctl cache purge --chat general
    """


@cache.command()
@click.option(
    "--chat",
    "chat_ids",
    multiple=True,
    metavar="ID",
    help="Only this chat's entries (repeatable). Default: every chat.",
)
@pass_ctx
def purge(obj: Ctx, chat_ids: tuple[str, ...]) -> None:
    """Remove chatd's cache entries from Redis.

    Only this deployment's keys are touched (CHATD_REDIS_PREFIX, default
    chatd:<database name>); other applications' keys and other chatd
    deployments sharing the Redis are left alone. Safe while chatd runs: the
    cache is only a copy of PostgreSQL, refilled on the next read.

    \b
    Example:
      chatctl cache purge                 # every chat of this deployment
      chatctl cache purge --chat general --chat random
    """
    for chat_id in chat_ids:
        try:
            validate.chat_id(chat_id, "--chat")
        except BadRequest as exc:
            raise click.BadParameter(exc.message, param_hint="--chat") from None
    obj.redis_url()  # a usage error without Redis: there is no cache to purge
    page_cache = obj.page_cache()
    removed = obj.run(page_cache.purge(list(chat_ids) if chat_ids else None))
    scope = f"{len(chat_ids)} chat(s)" if chat_ids else f"prefix {obj.settings.redis_prefix}"
    click.echo(f"removed {removed} cache key(s) ({scope})")
