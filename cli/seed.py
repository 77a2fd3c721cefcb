"""chatctl seed: chats, members and messages from a file (or demo data).

Everything is written through chatd's domain layer (:class:`ChatService`), so
seq, the page cache and idempotency hold exactly as for REST, and the events
of new messages reach the sockets of every running chatd (through the
Socket.IO Redis channel, when Redis is configured).

Re-running is safe. Each seeded message gets a deterministic ``client_id``
(unless the file gives one), so a message already sent is found, not sent
again; a chat that exists already is reconciled: missing members are added and
roles set as the file says (members the file does not list are left alone,
nothing is ever deleted). The whole file is validated before anything is
written, and an error names the line (YAML) or position (JSON) and the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import orjson
import yaml

from chatd import validate
from chatd.domain import MAX_EMOJI
from chatd.errors import BadRequest, Conflict

from .context import Ctx, Failure, pass_ctx

# Chats seeded at once: each chat's messages go in file order (that is their
# seq order), different chats in parallel, within the CLI's small pool.
PARALLEL_CHATS = 4
DEMO_USERS = ("alice", "bob", "carol", "dave")


@dataclass
class ChatPlan:
    id: str
    title: str
    visibility: str
    members: dict[str, str]  # user -> role, in file order
    messages: list[tuple[str, str, str]] = field(default_factory=list)  # sender, content, cid
    # Version 2, by message index: the earlier message it answers, and its
    # reactions (emoji -> users, in order).
    replies: dict[int, int] = field(default_factory=dict)
    reactions: dict[int, dict[str, list[str]]] = field(default_factory=dict)


@dataclass
class Tally:
    chats_created: int = 0
    chats_existing: int = 0
    members_added: int = 0
    members_changed: int = 0
    messages_sent: int = 0
    messages_existing: int = 0
    reactions_added: int = 0


class BadFile(click.ClickException):
    """A seed file that cannot be used: bad input, so exit 2, on one line."""

    exit_code = 2


class SeedFileError(Exception):
    """A seed file is malformed; the message names the line or the key."""


# -- reading and validating the file -----------------------------------------


def _yaml_lines(node: yaml.Node, path: str, out: dict[str, int]) -> None:
    """The line of every key path of a composed YAML document (``chats[1].title``)."""
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            _yaml_lines(value, f"{path}.{name}" if path else name, out)
            out.setdefault(f"{path}.{name}" if path else name, key.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _yaml_lines(item, f"{path}[{i}]", out)


def load_file(path: Path) -> tuple[object, dict[str, int]]:
    """The document, and the line of each key path (YAML; empty for JSON)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise SeedFileError(f"cannot read it: {exc.strerror or exc}") from None
    is_json = path.suffix.lower() == ".json" or (
        path.suffix.lower() not in (".yaml", ".yml") and text.lstrip()[:1] in (b"{", b"[")
    )
    if is_json:
        try:
            return orjson.loads(text), {}
        except orjson.JSONDecodeError as exc:
            raise SeedFileError(f"line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: dict[str, int] = {}
        _yaml_lines(node, "", lines)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SeedFileError(f"{where}{exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise SeedFileError(str(exc).splitlines()[0]) from None
    finally:
        loader.dispose()


def message_client_id(chat_id: str, sender: str, content: str, occurrence: int) -> str:
    """A stable client_id for a seeded message without one: the same message
    of the same file gets the same id on every run (repeats of one text by one
    sender are told apart by their occurrence)."""
    digest = hashlib.sha256(f"{chat_id}\0{sender}\0{content}\0{occurrence}".encode()).hexdigest()
    return f"seed-{digest[:40]}"


class _Checker:
    def __init__(self, lines: dict[str, int], max_length: int):
        self.lines = lines
        self.max_length = max_length

    def fail(self, path: str, message: str):
        # A missing key has no line of its own: use its parent's.
        at = path
        while at and at not in self.lines:
            at = at[: max(at.rfind("."), at.rfind("["), 0)]
        line = self.lines.get(at)
        where = f"line {line}: {path}" if line else path
        raise SeedFileError(f"{where}: {message}")

    def check(self, path: str, fn, value, *args):
        try:
            return fn(value, *args)
        except BadRequest as exc:
            # The validators name the API field; say it in the file's terms.
            self.fail(path, exc.message)

    def mapping(self, path: str, value: object, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            self.fail(path, "must be a mapping")
        for key in value:
            if key not in allowed:
                self.fail(f"{path}.{key}", f"unknown key (expected {', '.join(sorted(allowed))})")
        return value


def parse_plans(doc: object, lines: dict[str, int], max_length: int) -> list[ChatPlan]:
    """Validate the whole document (with chatd's own validators) into plans."""
    c = _Checker(lines, max_length)
    if isinstance(doc, dict):
        c.mapping("", doc, {"chats"})
        doc = doc.get("chats")
        if not isinstance(doc, list):
            c.fail("chats", "must be a list of chats")
        base = "chats"
    elif isinstance(doc, list):
        base = ""
    else:
        raise SeedFileError("the file must hold a list of chats, or a mapping with 'chats'")
    plans: list[ChatPlan] = []
    seen: dict[str, str] = {}
    for i, raw in enumerate(doc):
        p = f"{base}[{i}]"
        chat = c.mapping(p, raw, {"id", "title", "visibility", "members", "messages"})
        if "id" not in chat:
            c.fail(p, "id is required")
        chat_id = c.check(f"{p}.id", validate.chat_id, chat["id"], "id")
        if chat_id in seen:
            c.fail(f"{p}.id", f"chat {chat_id!r} is listed twice (first at {seen[chat_id]})")
        seen[chat_id] = p
        title = c.check(f"{p}.title", validate.title, chat.get("title"))
        visibility = c.check(f"{p}.visibility", validate.visibility, chat.get("visibility"))
        members: dict[str, str] = {}
        raw_members = chat.get("members")
        if not isinstance(raw_members, list) or not raw_members:
            c.fail(f"{p}.members", "must be a non-empty list (the first owner creates the chat)")
        for j, entry in enumerate(raw_members):
            mp = f"{p}.members[{j}]"
            if isinstance(entry, dict):
                c.mapping(mp, entry, {"user", "user_id", "role"})
                user = entry.get("user", entry.get("user_id"))
                role = c.check(f"{mp}.role", validate.role, entry.get("role"))
            else:
                user, role = entry, "member"
            user = c.check(mp, validate.user_id, user, "user")
            if user in members:
                c.fail(mp, f"user {user!r} is listed twice")
            members[user] = role
        if "owner" not in members.values():
            c.fail(f"{p}.members", "needs a member with role owner")
        plan = ChatPlan(chat_id, title, visibility, members)
        occurrences: dict[tuple[str, str], int] = {}
        raw_messages = chat.get("messages") or []
        if not isinstance(raw_messages, list):
            c.fail(f"{p}.messages", "must be a list")
        for k, entry in enumerate(raw_messages):
            mp = f"{p}.messages[{k}]"
            msg = c.mapping(mp, entry, {"sender", "content", "client_id", "reply_to", "reactions"})
            sender = c.check(f"{mp}.sender", validate.user_id, msg.get("sender"), "sender")
            # Even on a public chat (where posting joins): the chat may exist
            # already as private, and a half-seeded file is what we avoid.
            if sender not in members:
                c.fail(f"{mp}.sender", f"{sender!r} is not listed in the members of {chat_id!r}")
            content = c.check(f"{mp}.content", validate.content, msg.get("content"), max_length)
            cid = c.check(f"{mp}.client_id", validate.client_id, msg.get("client_id"))
            if cid is None:
                n = occurrences.get((sender, content), 0)
                occurrences[(sender, content)] = n + 1
                cid = message_client_id(chat_id, sender, content, n)
            plan.messages.append((sender, content, cid))
            if msg.get("reply_to") is not None:
                target = msg["reply_to"]
                if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < k:
                    c.fail(f"{mp}.reply_to", "must be the index (from 0) of an earlier message")
                plan.replies[k] = target
            raw_reactions = msg.get("reactions")
            if raw_reactions is not None:
                if not isinstance(raw_reactions, dict) or len(raw_reactions) > MAX_EMOJI:
                    c.fail(f"{mp}.reactions", f"must map at most {MAX_EMOJI} emoji to users")
                reactions: dict[str, list[str]] = {}
                for emoji, users in raw_reactions.items():
                    ep = f"{mp}.reactions.{emoji}"
                    c.check(ep, validate.emoji, emoji)
                    if not isinstance(users, list) or not users:
                        c.fail(ep, "must be a non-empty list of members")
                    for user in users:
                        if user not in members:
                            c.fail(ep, f"{user!r} is not listed in the members of {chat_id!r}")
                    reactions[emoji] = list(dict.fromkeys(users))
                plan.reactions[k] = reactions
        plans.append(plan)
    return plans


def demo_plans(chats: int, messages: int) -> list[ChatPlan]:
    plans = []
    for i in range(1, chats + 1):
        members = {u: ("owner" if u == DEMO_USERS[0] else "member") for u in DEMO_USERS}
        plan = ChatPlan(f"demo-{i}", f"Demo chat {i}", "public" if i % 2 else "private", members)
        for j in range(1, messages + 1):
            sender = DEMO_USERS[j % len(DEMO_USERS)]
            plan.messages.append((sender, f"demo message {j} of demo-{i}", f"demo-{j}"))
        plans.append(plan)
    return plans


# -- writing, through the domain ---------------------------------------------


async def apply_plan(domain, plan: ChatPlan, tally: Tally, advance) -> None:
    storage = domain.storage
    # The chat first, then its members: a chat and its first members commit
    # together, so a chat seen here has its members (read the other way round,
    # a concurrent seed could commit in between: a chat with no members).
    row = await storage.chat(plan.id)
    existing = {m[0]: m[1] for m in await storage.members(plan.id)} if row is not None else {}
    fresh: set[str] = set()
    if row is None:
        owner = next(u for u, r in plan.members.items() if r == "owner")
        others = [u for u in plan.members if u != owner]
        body = {
            "id": plan.id,
            "title": plan.title,
            "visibility": plan.visibility,
            "members": others,
        }
        try:
            created = await domain.create_chat(owner, body)
        except Conflict:  # created just now by someone else (another seed)
            return await apply_plan(domain, plan, tally, advance)
        tally.chats_created += 1
        tally.members_added += len(created["members"])
        existing = {m["user_id"]: m["role"] for m in created["members"]}
        fresh = set(existing)
        actor = owner
    else:
        tally.chats_existing += 1
        if (row[1], row[2]) != (plan.title, plan.visibility):
            click.echo(
                f"note: chat {plan.id!r} exists as {row[1]!r} ({row[2]}); its title and "
                "visibility are left as they are",
                err=True,
            )
        owners = [u for u, r in existing.items() if r == "owner"]
        if not owners:
            raise Failure(f"chat {plan.id!r} exists but has no owner to act for the seed")
        # Act as an owner the file keeps as owner when there is one, so that
        # demoting the others is allowed and the chat never lacks an owner.
        actor = next((u for u in owners if plan.members.get(u) == "owner"), owners[0])
    # Owners first: a demotion afterwards always leaves one.
    order = sorted(plan.members.items(), key=lambda ur: ur[1] != "owner")
    for user, role in order:
        if existing.get(user) == role:
            continue
        await domain.put_member(actor, plan.id, user, {"role": role})
        if user in fresh:
            pass  # created just now as a member: its role is part of "added"
        elif user in existing:
            tally.members_changed += 1
        else:
            tally.members_added += 1
        existing[user] = role
    ids: list[int] = []
    for k, (sender, content, cid) in enumerate(plan.messages):
        parent = plan.replies.get(k)
        posted = await domain.send(
            sender, plan.id, content, cid,
            reply_to=None if parent is None else ids[parent],
        )  # fmt: skip
        ids.append(posted.message["id"])
        if posted.created:
            tally.messages_sent += 1
        else:
            tally.messages_existing += 1
        for emoji, users in plan.reactions.get(k, {}).items():
            for user in users:  # the same reaction again changes nothing
                if (await domain.react(user, posted.message["id"], emoji)).created:
                    tally.reactions_added += 1
        advance(1)


async def apply_all(domain, plans: list[ChatPlan], advance) -> Tally:
    tally = Tally()
    gate = asyncio.Semaphore(PARALLEL_CHATS)

    async def one(plan: ChatPlan) -> None:
        async with gate:
            await apply_plan(domain, plan, tally, advance)

    await asyncio.gather(*(one(p) for p in plans))
    return tally


@click.command()
@click.argument(
    "file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--demo", is_flag=True, help="Generate demo chats instead of reading FILE.")
@click.option(
    "--chats",
    "n_chats",
    type=click.IntRange(1, 10_000),
    default=3,
    show_default=True,
    help="With --demo: how many chats (demo-1 ... demo-N).",
)
@click.option(
    "--messages",
    "n_messages",
    type=click.IntRange(0, 1_000_000),
    default=20,
    show_default=True,
    help="With --demo: messages per chat.",
)
@click.option("--dry-run", is_flag=True, help="Validate FILE and say what it holds; write nothing.")
@pass_ctx
def seed(
    obj: Ctx, file: Path | None, demo: bool, n_chats: int, n_messages: int, dry_run: bool
) -> None:
    """Create chats, members and messages from FILE (YAML or JSON), or demo data.

    \b
    FILE holds a list of chats (or a mapping with `chats:`):
      chats:
        - id: general
          title: General
          visibility: public          # default private
          members:
            - {user: alice, role: owner}
            - {user: bob, role: admin}
            - carol                   # role member
          messages:
            - {sender: alice, content: "Welcome!"}
            - {sender: bob, content: "Hi", client_id: "hi-1"}
            - {sender: carol, content: "Hello!", reply_to: 0,   # answers message 0
               reactions: {"👍": [alice, bob], ":tada:": [bob]}}

    Every sender and reacting user must be listed under members. Running the same file again
    changes nothing; an existing chat gets the file's members and roles
    (others are kept; title and visibility are not changed). Nothing is
    written unless the whole file is valid.

    \b
    Example:
      chatctl seed fixtures/chats.yaml
      chatctl seed --demo --chats 10 --messages 500
    """
    if demo == (file is not None):
        raise click.UsageError("give either FILE or --demo")
    if demo:
        plans = demo_plans(n_chats, n_messages)
    else:
        try:
            doc, lines = load_file(file)
            plans = parse_plans(doc, lines, obj.settings.max_message_length)
        except SeedFileError as exc:
            raise BadFile(f"{file}: {exc}") from None
    total = sum(len(p.messages) for p in plans)
    if dry_run:
        members = sum(len(p.members) for p in plans)
        click.echo(f"valid: {len(plans)} chat(s), {members} member(s), {total} message(s)")
        return
    domain = obj.domain()
    with click.progressbar(length=total, label="seeding", file=sys.stderr, show_pos=True) as bar:
        tally = obj.run(apply_all(domain, plans, bar.update))
    click.echo(
        f"chats: {tally.chats_created} created, {tally.chats_existing} already there; "
        f"members: {tally.members_added} added, {tally.members_changed} re-roled; "
        f"messages: {tally.messages_sent} sent, {tally.messages_existing} already there; "
        f"reactions: {tally.reactions_added} added"
    )
