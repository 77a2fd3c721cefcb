"""chatctl chats: admin views of every chat (no user's perspective)."""

from __future__ import annotations

import click
import orjson

from chatd import model, validate
from chatd.errors import BadRequest

from .context import Ctx, Failure, format_option, pass_ctx

PAGE = 500


@click.group()
def chats() -> None:
    """Look at chats as an admin (all of them, whoever is in them).

    \b
    Example:
      chatctl chats list
      chatctl chats show general
    """


@chats.command("list")
@format_option("text: a table; json: one chat per line.")
@pass_ctx
def list_chats(obj: Ctx, fmt: str) -> None:
    """Every chat, by id, with its member count, last seq and creation time.

    \b
    Example:
      chatctl chats list
      chatctl chats list --format json | jq -r 'select(.members > 100) | .id'
    """
    storage = obj.storage()
    if fmt == "text":
        header = f"{'ID':24} {'VISIBILITY':10} {'MEMBERS':>7} {'LAST_SEQ':>8}  {'CREATED':24}"
        click.echo(header + " TITLE")
    after, count = "", 0
    while True:  # keyset pages by id: constant memory however many chats
        rows = obj.run(storage.admin_chats(after, PAGE))
        for row in rows:
            chat = model.chat(row[: model.N_CHAT])
            chat["members"] = row[model.N_CHAT]
            count += 1
            if fmt == "json":
                click.echo(orjson.dumps(chat).decode())
            else:
                click.echo(
                    f"{chat['id']:24} {chat['visibility']:10} {chat['members']:>7} "
                    f"{chat['last_seq']:>8}  {chat['created_at']:24} {chat['title']}"
                )
        if len(rows) < PAGE:
            break
        after = rows[-1][0]
    if fmt == "text":
        click.echo(f"{count} chat(s)", err=True)


@chats.command()
@click.argument("chat_id", metavar="ID")
@format_option("json: the Chat object of API.md, members included.")
@pass_ctx
def show(obj: Ctx, chat_id: str, fmt: str) -> None:
    """One chat with its members and their roles.

    \b
    Example:
      chatctl chats show general
      chatctl chats show general --format json
    """
    try:
        validate.chat_id(chat_id, "ID")
    except BadRequest as exc:
        raise click.BadParameter(exc.message, param_hint="ID") from None
    storage = obj.storage()

    async def fetch():
        return await storage.chat(chat_id), await storage.members(chat_id)

    row, members = obj.run(fetch())
    if row is None:
        raise Failure(f"chat {chat_id!r} not found")
    chat = model.chat(row, [model.member(m) for m in members])
    if fmt == "json":
        click.echo(orjson.dumps(chat).decode())
        return
    click.echo(f"id          {chat['id']}")
    click.echo(f"title       {chat['title']}")
    click.echo(f"visibility  {chat['visibility']}")
    click.echo(f"created     {chat['created_at']} by {chat['created_by']}")
    click.echo(f"last_seq    {chat['last_seq']}")
    click.echo(f"members     {len(chat['members'])}")
    for m in chat["members"]:
        click.echo(
            f"  {m['user_id']:24} {m['role']:7} joined {m['joined_at']}  read {m['last_read_seq']}"
        )
