"""Tornado's server websocket, reading frames from callbacks instead of a
coroutine that lives as long as the connection.

Tornado reads a websocket's frames in a loop (``_receive_frame_loop``) awaited
at the end of the upgrade request's handling: ``RequestHandler._execute`` ->
``WebSocketHandler.get`` -> ``accept_connection`` -> ``_accept_connection``
-> the loop -> ``_receive_frame`` -> ``_read_bytes``. Those eight coroutines
stay suspended for the websocket's whole life, and ``get``'s frame keeps the
upgrade request's parsed headers alive with them: most of what an idle
websocket costs on Tornado's side (docs/PERFORMANCE.md, "conns").

:class:`EventWebSocketProtocol` is Tornado's ``WebSocketProtocol13`` whose
loop only starts reading and returns, so the upgrade request's handling ends
once the websocket is open. What the connection then holds while idle is one
pending read of its stream with this protocol's callback on it. Each chunk
read is parsed into frames with the same rules as Tornado's
``_receive_frame`` (reserved bits, control frames, fragments, the
``max_message_size`` cap answered with close code 1009, masking), and every
complete message goes to ``WebSocketProtocol13._handle_message`` as before,
which calls the handler's ``on_message``. A handler whose ``on_message``
returns an awaitable holds the reading until it is done, as Tornado does;
the connection's end calls ``on_ws_connection_close`` once, as Tornado's loop
does in its ``finally``.

With permessage-deflate negotiated (``WS_COMPRESSION=true``) the protocol
keeps Tornado's own loop: the decompression rules are Tornado's to keep.

Tornado internals this relies on (6.x; exercised by
tests/test_websocket_transport.py and every websocket test): that
``_accept_connection`` ends by awaiting ``_receive_frame_loop``, and
``WebSocketProtocol13``'s ``_handle_message``, ``_abort``, ``params``,
``_decompressor``, ``_fragmented_message_buffer`` / ``_opcode``,
``_wire_bytes_in``, ``FIN`` / ``RSV_MASK`` / ``OPCODE_MASK``; chatd.server's
handler builds it in ``get_websocket_protocol`` with
``tornado.websocket._WebSocketParams``.
"""

from __future__ import annotations

import functools
import struct
import sys

from tornado.iostream import StreamClosedError
from tornado.util import _websocket_mask
from tornado.websocket import WebSocketProtocol13

# Bytes asked of the stream per read: whatever it has, up to this.
READ_CHUNK = 65536

_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")


class EventWebSocketProtocol(WebSocketProtocol13):
    # Bytes read that do not make a whole frame yet; None once the reading
    # is over. A class default, set on the instance only when there are
    # some: every attribute added is a bigger __dict__ per connection.
    _pending = b""

    async def _receive_frame_loop(self) -> None:
        if self._decompressor is not None:
            await super()._receive_frame_loop()
            return
        self._read()

    # -- reading ---------------------------------------------------------------

    def _read(self) -> None:
        try:
            fut = self.stream.read_bytes(READ_CHUNK, partial=True)
        except StreamClosedError:
            self._abort()
            self._over()
            return
        fut.add_done_callback(self._on_read)

    def _on_read(self, fut) -> None:
        try:
            chunk = fut.result()
        except StreamClosedError:
            self._abort()
            self._over()
            return
        except BaseException:  # a cancelled read, or worse: the end as well
            self.handler.log_exception(*sys.exc_info())
            self._abort()
            self._over()
            return
        pending = self._pending
        if pending:
            self._pending = b""
            chunk = pending + chunk
        self._consume(chunk)

    def _consume(self, buf) -> None:
        """Handle the whole frames in ``buf``, keep the rest, read on."""
        waiting = None
        try:
            waiting = self._frames(buf)
        except Exception:
            self.handler.log_exception(*sys.exc_info())
            self._abort()
        if self.client_terminated:
            self._over()
        elif waiting is None:
            self._read()

    def _frames(self, buf):
        """Handle every whole frame in ``buf``; what is left is kept for the
        next read. Returns the awaitable an ``on_message`` returned, if one
        did (the rest then waits for it), else None."""
        pos, end = 0, len(buf)
        max_size = self.params.max_message_size
        while not self.client_terminated:
            if end - pos < 2:
                break
            header, second = buf[pos], buf[pos + 1]
            is_final_frame = header & self.FIN
            opcode = header & self.OPCODE_MASK
            opcode_is_control = opcode & 0x8
            if header & self.RSV_MASK:
                self._abort()  # as Tornado: extensions nobody agreed to
                return None
            is_masked = second & 0x80
            payloadlen = second & 0x7F
            if opcode_is_control and payloadlen >= 126:
                self._abort()  # control frames carry under 126 bytes
                return None
            start = pos + 2
            if payloadlen == 126:
                if end - pos < 4:
                    break
                payloadlen = _LEN16.unpack_from(buf, start)[0]
                start += 2
            elif payloadlen == 127:
                if end - pos < 10:
                    break
                payloadlen = _LEN64.unpack_from(buf, start)[0]
                start += 8
            new_len = payloadlen
            if self._fragmented_message_buffer is not None:
                new_len += len(self._fragmented_message_buffer)
            if new_len > max_size:
                self.close(1009, "message too big")
                self._abort()
                return None
            if is_masked:
                start += 4
            stop = start + payloadlen
            if stop > end:
                break
            data = bytes(buf[start:stop])
            if is_masked:
                data = _websocket_mask(bytes(buf[start - 4 : start]), data)
            self._wire_bytes_in += stop - pos
            pos = stop

            # What to do with the frame: Tornado's _receive_frame from here.
            if opcode_is_control:
                if not is_final_frame:
                    self._abort()  # control frames are never fragmented
                    return None
            elif opcode == 0:  # continuation frame
                if self._fragmented_message_buffer is None:
                    self._abort()  # nothing to continue
                    return None
                self._fragmented_message_buffer.extend(data)
                if is_final_frame:
                    opcode = self._fragmented_message_opcode
                    data = bytes(self._fragmented_message_buffer)
                    self._fragmented_message_buffer = None
            else:  # start of a new data message
                if self._fragmented_message_buffer is not None:
                    self._abort()  # the previous one is not finished
                    return None
                if not is_final_frame:
                    self._fragmented_message_opcode = opcode
                    self._fragmented_message_buffer = bytearray(data)
            if is_final_frame:
                handled = self._handle_message(opcode, data)
                if handled is not None:
                    handled.add_done_callback(functools.partial(self._resume, buf[pos:]))
                    return handled
        if pos < end:
            self._pending = bytes(buf[pos:])
        return None

    def _resume(self, rest, _handled) -> None:
        self._consume(rest)

    def _over(self) -> None:
        if self._pending is not None:
            self._pending = None
            self.handler.on_ws_connection_close(self.close_code, self.close_reason)
