"""Socket.IO: the python-socketio server, its event handlers and the emitter
that turns domain events into room broadcasts.

- chatd.realtime.rooms: the room names, and the pub/sub messages that carry
  emits between processes;
- chatd.realtime.server: the python-socketio server, the Origin check, the
  libraries' log filter;
- chatd.realtime.managers: the client managers, where every emit is filtered
  and relayed to the other processes;
- chatd.realtime.namespace: the socket event handlers, and the domain's events
  turned into emits.

Every public name is re-exported here (``chatd.realtime.ChatServer``). A
constant is read from the module that defines it: patch it there.

The library internals chatd overrides (the one list of them)
------------------------------------------------------------

python-socketio offers no public hooks for what chatd.realtime.managers adds,
so chatd overrides a few of its internal methods (stable across 5.x, and
every one exercised by tests/test_cluster.py, so an upgrade that changes them
fails loudly there):
``AsyncServer._handle_event_internal`` (after-ack hooks),
``AsyncPubSubManager._handle_emit`` / ``_publish`` / ``_listen`` /
``initialize``, ``AsyncServer.manager_initialized`` and
``AsyncNamespace._set_server``; and
``AsyncServer._engineio_server_class`` for chatd's engine.io server
(chatd.delivery, exercised by tests/test_realtime_delivery.py). Also:

- ``AsyncServer._handle_eio_message`` (refuses binary frames and attachment
  packets, acks unparsable events; python-socketio's dispatch otherwise) and
  ``Packet.decode`` (:class:`ChatPacket`, via ``serializer=``): exercised by
  tests/test_socket_hostile.py;
- ``AsyncServer._handle_eio_disconnect`` (rooms left at once, handlers in
  batches), ``BaseManager.basic_enter_room`` / ``basic_leave_room`` /
  ``basic_disconnect`` / ``get_rooms`` (a sid -> rooms index) and the
  ``pending_connect`` / ``pending_disconnect`` tables (dicts with the list
  methods python-socketio calls): exercised by tests/test_disconnect_storm.py
  and every connect and disconnect in tests/test_realtime*.py and
  tests/test_cluster.py;
- per-room channels (:class:`RedisChatManager`): ``BaseManager.rooms`` (a
  room leaves that dict when its last socket leaves: the subscribe and
  unsubscribe points, in ``basic_enter_room`` / ``basic_leave_room``),
  ``AsyncPubSubManager.enter_room`` (awaited by every join, then the
  subscription's confirmation), the message ``method`` / ``room`` fields
  ``_publish`` routes on, and ``_thread`` reading ``_listen`` (python-socketio
  runs it; chatd's listener yields what chatd.relay's readers received):
  exercised by tests/test_cluster.py (each process receives only its chats'
  traffic, and every cross-process test); ``AsyncRedisManager.redis_url`` /
  ``redis_options`` / ``_get_redis_module`` (the listener's connection to one
  Redis) and ``AsyncPubSubManager.host_id`` / ``channel``: the same tests;
  ``AsyncPubSubManager._publish`` again in chatd.emitter (a write-only
  manager publishing on the room's channel): tests/test_cli_seed.py.

The log
filter :class:`_ClientFaults` (chatd.realtime.server) recognises engine.io's client-error lines by
the name of the internal method that logs them, ``_log_error_once``
(exercised by tests/test_first_hour.py, the "plain line" test).

Tornado's HTTP layer is overridden likewise in chatd.httpconn (exercised by
tests/test_http_edge.py): ``HTTP1Connection._read_message_inner`` (server
side; it reads ``IOStream._read_buffer_size``), ``write_headers``, ``write``,
``finish``, ``_finish_request``,
``HTTP1ServerConnection._server_request_loop``, ``HTTPServer.handle_stream``
(chatd.server.HTTPServer), ``_HTTPRequestContext._apply_xheaders``
(chatd.httpconn.RequestContext), and ``IOStream.write`` and
``BaseIOStream._handle_events`` (chatd.httpconn.ServerStream: Tornado 6.6's
``_handle_events`` with one condition changed; ``write`` reads
``_write_buffer``, ``_connecting``, ``_closed`` and keeps
``_total_write_index`` / ``_total_write_done_index`` in step; tests:
tests/test_http_edge.py and tests/test_websocket_transport.py, a slow reader
each, and the keep-alive POSTs that stay in epoll).

The event loop is asyncio's, built on chatd.fairselect's selector (through
``SelectorEventLoop(selector)``, asyncio's own hook; the selector extends
``selectors.EpollSelector``'s ``select`` / ``register`` / ``unregister`` /
``modify``): websockets, marked in the Socket.IO handler's ``open`` /
``on_close`` (chatd.server), wait their turn in a storm (exercised by
tests/test_fairselect.py, and by tests/test_disconnect_storm.py's 300 sockets
ending in one turn).
"""

from .managers import (
    INTERNAL_LEAVE,
    VERSIONED,
    ChatManagerMixin,
    LocalChatManager,
    RedisChatManager,
)
from .namespace import (
    DISCONNECT_LOG_USERS,
    MAX_ROOMS_PER_SOCKET,
    ChatNamespace,
    NewMessages,
    SocketEvents,
    after_ack,
)
from .rooms import (
    BATCH,
    chat_room,
    emit_message,
    publication,
    user_room,
)
from .server import (
    DISCONNECT_BATCH,
    MAX_PACKET,
    ChatPacket,
    ChatServer,
    OriginGuard,
    OrjsonPackets,
    create_server,
)

__all__ = [
    "BATCH",
    "DISCONNECT_BATCH",
    "DISCONNECT_LOG_USERS",
    "INTERNAL_LEAVE",
    "MAX_PACKET",
    "MAX_ROOMS_PER_SOCKET",
    "VERSIONED",
    "ChatManagerMixin",
    "ChatNamespace",
    "ChatPacket",
    "ChatServer",
    "LocalChatManager",
    "NewMessages",
    "OriginGuard",
    "OrjsonPackets",
    "RedisChatManager",
    "SocketEvents",
    "after_ack",
    "chat_room",
    "create_server",
    "emit_message",
    "publication",
    "user_room",
]
