"""chatctl tail: follow messages as every chatd process emits them.

chatd publishes each chat's emits on that chat's Redis channel
(``SOCKETIO_CHANNEL:{chat:ID}``, see chatd.relay; sharded pub/sub on Redis >= 7),
as JSON ``{"method": "emit", "event", "data": [payload], "room": "chat:ID", ...}``
(a group commit's new messages as one ``chatd:batch`` of such emits);
tail subscribes to the channels of the chats it follows (``--chat``, required:
no channel carries every chat), so it sees what every process's sockets see.

``--since-seq N`` first prints the history after seq N. To leave no gap and
print nothing twice at the seam it subscribes first (Redis then delivers every
later publish), buffers the live events while it pages through the history,
and then flushes the buffer, dropping each ``new-message`` whose seq it has
already printed. Edits and deletes are never dropped: one that raced the
history read may show once more, but none is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import click
import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from chatd import config, model, relay, validate
from chatd.errors import BadRequest
from chatd.realtime import BATCH

from .context import Ctx, Failure, format_option, pass_ctx

EVENTS = ("new-message", "message-updated", "message-deleted")
PAGE = 200


class Seen:
    """The seqs of one chat already printed: everything up to ``upto``, plus
    the ones above it (events from several processes may arrive out of order,
    so a later seq is no proof that an earlier one was printed)."""

    def __init__(self, upto: int):
        self.upto = upto
        self.above: set[int] = set()

    def add(self, seq: int) -> bool:
        """Record ``seq``; False if it was printed already."""
        if seq <= self.upto or seq in self.above:
            return False
        self.above.add(seq)
        while self.upto + 1 in self.above:
            self.upto += 1
            self.above.discard(self.upto)
        if len(self.above) > 10_000:  # a lost publish must not grow this forever
            self.upto = min(self.above)
            self.above = {s for s in self.above if s > self.upto}
        return True


def format_event(event: str, data: dict, fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps({"event": event, "data": data}).decode()
    chat, seq = data.get("chat_id"), data.get("seq")
    if event == "message-deleted":
        return f"[{chat}] #{seq} deleted (id {data.get('id')})"
    if data.get("deleted"):
        return f"{data.get('created_at')} [{chat}] #{seq} {data.get('sender_id')}: (deleted)"
    mark = ""
    if event == "message-updated":
        # An update is an edit, or (version 2) a reaction, pin or reply count.
        mark = " (edited)" if data.get("edited_at") else " (updated)"
    return (
        f"{data.get('created_at')} [{chat}] #{seq} {data.get('sender_id')}{mark}: "
        f"{data.get('content')}{_conversation(data)}"
    )


def _conversation(data: dict) -> str:
    """The version 2 fields a reader of the text wants, when they say something:
    `` [reply to 1040] [2 replies] [pinned] [👍 2, :tada: 1]``."""
    parts = []
    if data.get("reply_to") is not None:
        parts.append(f"reply to {data['reply_to']}")
    if data.get("reply_count"):
        parts.append(f"{data['reply_count']} repl{'y' if data['reply_count'] == 1 else 'ies'}")
    if data.get("pinned"):
        parts.append("pinned")
    reactions = data.get("reactions")
    if isinstance(reactions, list) and reactions:
        parts.append(", ".join(f"{r.get('emoji')} {r.get('count')}" for r in reactions
                               if isinstance(r, dict)))  # fmt: skip
    return "".join(f" [{p}]" for p in parts)


def decode(raw: bytes, rooms: set[str] | None) -> list[tuple[str, dict]]:
    """(event, payload) of each message event of the watched rooms in a
    publication: one emit, or a batch of them (a group commit's new messages,
    ``{"method": "chatd:batch", "messages": [emit, ...]}``), in order."""
    try:
        packet = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return []
    if isinstance(packet, dict) and packet.get("method") == BATCH:
        emits = packet.get("messages")
        emits = emits if isinstance(emits, list) else []
    else:
        emits = [packet]
    found = []
    for emit in emits:
        one = _decode_emit(emit, rooms)
        if one is not None:
            found.append(one)
    return found


def _decode_emit(packet: object, rooms: set[str] | None) -> tuple[str, dict] | None:
    if not isinstance(packet, dict) or packet.get("method") != "emit":
        return None
    event, room, data = packet.get("event"), packet.get("room"), packet.get("data")
    if event not in EVENTS or packet.get("namespace", "/") != "/":
        return None
    if not isinstance(room, str) or not room.startswith("chat:"):
        return None
    if rooms is not None and room not in rooms:
        return None
    if isinstance(data, list):
        data = data[0] if data else None
    if not isinstance(data, dict):
        return None
    return event, data


async def follow(
    obj: Ctx, storage, chat_ids: list[str], fmt: str, since_seq: int | None, echo
) -> None:
    s = obj.settings
    buffered: asyncio.Queue[bytes] = asyncio.Queue()
    rooms = {f"chat:{c}" for c in chat_ids} if chat_ids else None
    channels = [relay.room_channel(s.socketio_channel, room) for room in sorted(rooms or ())]
    wait = s.redis_timeout * 5
    # chatd's own listener (chatd.relay): a connection per Redis node without
    # a read timeout (a subscriber waits as long as the chats are quiet), a
    # ping when idle, and every channel subscribed again after a reconnect.
    seeds = config.cluster_nodes(s.redis_url)
    cluster = None
    if seeds is not None:
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            socket_connect_timeout=s.redis_timeout,
        )

        def connect(node: str) -> aioredis.Redis:
            found = cluster.get_node(node_name=node)
            return aioredis.Redis(
                host=found.host, port=found.port, socket_connect_timeout=s.redis_timeout
            )

        def node_of(channel: str) -> str:
            return cluster.get_node_from_key(channel).name
    else:

        def connect(node: str) -> aioredis.Redis:
            return aioredis.Redis.from_url(s.redis_url, socket_connect_timeout=s.redis_timeout)

        def node_of(channel: str) -> str:
            return ""

    listener = relay.Relay(
        channels[0], connect, node_of, buffered.put_nowait, cluster=cluster is not None,
        ack_timeout=wait,
    )  # fmt: skip
    try:
        if cluster is not None:
            await asyncio.wait_for(cluster.initialize(), wait)
        listener.start()
        for channel in channels[1:]:
            listener.want(channel)
        # Wait for Redis to confirm: from then on every publish reaches us.
        for channel in channels:
            if not await listener.ready(channel):
                raise Failure(f"Redis did not confirm the subscription to {channel}")
        what = ", ".join(chat_ids) if chat_ids else "every chat"
        click.echo(f"tail: following {what} (Ctrl-C to stop)", err=True)

        seen: dict[str, Seen] = {}
        if since_seq is not None:
            for chat_id in chat_ids:
                if await storage.chat(chat_id) is None:
                    raise Failure(f"chat {chat_id!r} not found")
                after = since_seq
                while True:  # keyset pages, ascending; tombstones keep seq gapless
                    rows = await storage.history(
                        chat_id, limit=PAGE, after_seq=after, include_deleted=True
                    )
                    for row in rows:
                        echo(format_event("history", model.message(row), fmt))
                        after = row[2]
                    if len(rows) < PAGE:
                        break
                seen[chat_id] = Seen(after)

        while True:  # the listener reconnects by itself when Redis goes away
            raw = await buffered.get()
            for event, data in decode(raw, rooms):
                if event == "new-message" and since_seq is not None:
                    chat_seen = seen.get(data.get("chat_id"))
                    seq = data.get("seq")
                    if chat_seen is not None and isinstance(seq, int) and not chat_seen.add(seq):
                        continue
                echo(format_event(event, data, fmt))
    finally:
        await listener.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                await cluster.aclose()


async def until_stopped(coro) -> None:
    """Run ``coro`` until SIGINT or SIGTERM, then return quietly. Installed on
    the loop itself, so Ctrl-C works even where the shell started chatctl with
    SIGINT ignored (a background job), and a service manager's SIGTERM is a
    clean stop too."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        stopped = True
        task.cancel()

    sigs = (signal.SIGINT, signal.SIGTERM)
    for sig in sigs:
        loop.add_signal_handler(sig, stop)
    try:
        await coro
    except asyncio.CancelledError:
        if not stopped:
            raise
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)


@click.command()
@click.option(
    "--chat",
    "chat_ids",
    multiple=True,
    metavar="ID",
    help="Only this chat (repeatable). Default: every chat.",
)
@format_option('json: one {"event", "data"} object per line.')
@click.option(
    "--since-seq",
    type=click.IntRange(min=0),
    metavar="N",
    help="First print the history after seq N (needs --chat).",
)
@pass_ctx
def tail(obj: Ctx, chat_ids: tuple[str, ...], fmt: str, since_seq: int | None) -> None:
    """Print messages as they are sent, edited and deleted, on every chatd
    process, until Ctrl-C.

    Follows the chats' Socket.IO channels in Redis (SOCKETIO_CHANNEL:{chat:ID}),
    so it needs REDIS_URL and at least one --chat. With --since-seq, history
    after seq N is printed first, then the live events, with no gap and no
    repeat between the two. In json format,
    history rows have "event": "history".

    \b
    Example:
      chatctl tail --chat general
      chatctl tail --chat general --since-seq 0 --format json | jq .data.content
    """
    for chat_id in chat_ids:
        try:
            validate.chat_id(chat_id, "--chat")
        except BadRequest as exc:
            raise click.BadParameter(exc.message, param_hint="--chat") from None
    if since_seq is not None and not chat_ids:
        raise click.UsageError("--since-seq needs --chat (the history of which chat?)")
    obj.redis_url()
    if not chat_ids:
        raise click.UsageError(
            "name the chats to follow with --chat (each chat has its own Redis channel)"
        )

    def echo(line: str) -> None:
        click.echo(line)  # click.echo flushes: a pipe reader sees each line at once

    storage = obj.storage() if since_seq is not None else None
    try:
        obj.run(until_stopped(follow(obj, storage, list(chat_ids), fmt, since_seq, echo)))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how tail ends
    except BrokenPipeError:
        pass  # the reader went away (tail | head)
