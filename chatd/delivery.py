"""Room broadcasts without a task per recipient.

python-socketio's AsyncManager.emit encodes a broadcast once, then creates an
asyncio task per recipient to queue the same packet on each socket, and waits
for them all. Queueing a packet on an engine.io socket is an
``await queue.put()`` on an unbounded queue, which never suspends, so the
tasks buy no concurrency: at 500 sockets and 20 messages/s they were 10,000
task creations a second. chatd's managers (chatd.realtime) queue the packet
on each recipient in turn instead. Every packet still goes through the
socket's own queue and writer, so events and acks keep the order they were
queued in.
"""

from __future__ import annotations

from engineio import packet as eio_packet
from socketio import packet


async def _deliver(manager, event, data, namespace, room, skip_sid) -> None:
    if namespace not in manager.rooms:
        return
    if isinstance(data, tuple):
        data = list(data)
    elif data is not None:
        data = [data]
    else:
        data = []
    skip = skip_sid if isinstance(skip_sid, list) else [skip_sid]
    encoded = manager.server.packet_class(
        packet.EVENT, namespace=namespace, data=[event, *data]
    ).encode()
    if not isinstance(encoded, list):
        encoded = [encoded]
    eio_pkts = [eio_packet.Packet(eio_packet.MESSAGE, p) for p in encoded]
    send = manager.server._send_eio_packet
    # A snapshot: a send that finds its socket timed out closes it, which
    # changes the room while we walk it.
    for sid, eio_sid in list(manager.get_participants(namespace, room)):
        if sid not in skip:
            for pkt in eio_pkts:
                await send(eio_sid, pkt)


async def deliver_message(manager, message: dict) -> bool:
    """Deliver a pub/sub emit message (python-socketio's format) to this
    process's sockets of its room; False when it needs python-socketio's own
    path (an emit with a callback, or binary data)."""
    if message.get("callback") is not None or message.get("binary"):
        return False
    data = message["data"]
    if isinstance(data, list):
        data = data[0] if len(data) == 1 else tuple(data)
    await _deliver(
        manager,
        message["event"],
        data,
        message.get("namespace") or "/",
        message.get("room"),
        message.get("skip_sid"),
    )
    return True
