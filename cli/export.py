"""chatctl export: a chat's messages as JSON lines."""

from __future__ import annotations

import sys

import click

from chatd import model, validate
from chatd.domain import dumps
from chatd.errors import BadRequest

from .context import Ctx, Failure, pass_ctx

# Rows per keyset page: large enough that round trips do not dominate, small
# enough that memory stays flat (a page is at most PAGE messages of 4000 chars).
PAGE = 500


@click.command()
@click.option("--chat", "chat_id", required=True, metavar="ID", help="The chat to export.")
@click.option(
    "--since-seq",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Only messages with seq above N (resume an export).",
)
@pass_ctx
def export(obj: Ctx, chat_id: str, since_seq: int) -> None:
    """Write a chat's messages to stdout as JSON lines, ordered by seq.

    One Message object of API.md per line, tombstones (deleted messages,
    content null) included, so seq is gapless. Streams in keyset pages over
    (chat_id, seq), so memory stays the same however long the chat is.

    \b
    Example:
      chatctl export --chat general > general.jsonl
      chatctl export --chat general --since-seq 1200 >> general.jsonl
    """
    try:
        validate.chat_id(chat_id, "--chat")
    except BadRequest as exc:
        raise click.BadParameter(exc.message, param_hint="--chat") from None
    storage = obj.storage()
    if obj.run(storage.chat(chat_id)) is None:
        raise Failure(f"chat {chat_id!r} not found")
    out = sys.stdout.buffer  # bytes as orjson makes them, no re-encoding
    after = since_seq
    while True:
        rows = obj.run(storage.history(chat_id, limit=PAGE, after_seq=after, include_deleted=True))
        if rows:
            out.write(b"".join(dumps(model.message(r)) + b"\n" for r in rows))
            after = rows[-1][2]
        if len(rows) < PAGE:
            break
    out.flush()
