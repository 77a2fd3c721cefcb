"""chatd's HTTP/1.1 connections: Tornado's, with a clear answer wherever
Tornado's own would drop the connection or answer with an empty body.

Tornado (6.6) leaves four things that clients and proxies trip over:

- **Early answers closed the connection unannounced.** An answer written
  before the request body was read (404, 405, 401 from ``prepare()``, a 413)
  made Tornado close the connection after it, without ``Connection: close``:
  a keep-alive pool (undici, nginx ``keepalive``) sent its next request into
  the closing socket. Here such a request's body is read and dropped when it
  is announced and small (``Content-Length`` up to :data:`DISCARD_LIMIT`) and
  the connection serves on; otherwise (a larger or chunked body) the answer
  says ``Connection: close`` and the connection closes after it.
- **Requests the parser refuses** (a malformed request line, HTTP/0.9 or
  HTTP/2.0, a bad header line, ``Content-Length`` with ``Transfer-Encoding``,
  a negative or conflicting ``Content-Length``, a bad chunk size, more than
  1,000 query fields) got a bare ``400`` with no body. Here they get the JSON
  error shape (400, or 413 for a body over ``max_body_size``), a request id,
  and ``Connection: close``.
- **A request head over** :data:`MAX_HEAD` **(64 KiB)** got no answer at all:
  here it is ``414 uri_too_long`` when the request line alone is that long,
  else ``431 headers_too_large``.
- **A body that never finishes** held its connection (and, as the request
  counted as in flight, every stop) until the idle timeout. Here a body not
  received within ``BODY_TIMEOUT`` seconds is answered ``408
  request_timeout`` (unless it was answered already) and the connection closes.

After an answer that closes, the connection is not dropped at once: its write
side is shut and what the client still sends is read and discarded for up to
:data:`LINGER_SECONDS` (as nginx's ``lingering_close``), so that the client
reads the answer instead of a reset.

The override: ``HTTP1Connection._read_message_inner`` (server side, an
adaptation of Tornado 6.6's; it also reads ``IOStream._read_buffer_size`` to
skip the body timer when the body has arrived with its headers),
``write_headers``, ``write``, ``finish`` and ``_finish_request``, and
``HTTP1ServerConnection._server_request_loop`` (to use this connection class),
and ``_HTTPRequestContext._apply_xheaders`` (skipped when a request has no
proxy headers); listed with chatd's other library overrides in
chatd/realtime/__init__.py, and exercised by tests/test_http_edge.py.

Two costs of Tornado's per request are gone, the behaviour kept: the wait
for a request head is bounded by one sweep per event loop (:class:`_IdleSweep`)
instead of a timer armed and cancelled per request, and the proxy headers are
only looked at when a request carries them.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import socket

import orjson
from tornado import gen, httputil, iostream
from tornado.concurrent import future_set_result_unless_cancelled
from tornado.http1connection import (
    HTTP1Connection,
    HTTP1ServerConnection,
    _ExceptionLoggingContext,
)
from tornado.httpserver import _HTTPRequestContext
from tornado.log import app_log, gen_log

from . import web
from .errors import ApiError, BadRequest, PayloadTooLarge

log = logging.getLogger("chatd.http")

# The request line and headers together (Tornado's own default).
MAX_HEAD = 64 * 1024
# An early answer keeps the connection when the body still to read is announced
# and at most this long (the REST body limit: a body chatd would have read anyway).
DISCARD_LIMIT = web.MAX_BODY
# After an answer that closes the connection: how long, and how much, of what
# the client still sends is read and dropped before the socket closes.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024

# The head up to its blank line (after any blank lines before it, which RFC
# 9112 says to ignore), or MAX_HEAD + 1 bytes of a head with no end in sight:
# the read then ends with what is needed to answer 414/431, where Tornado's
# ``max_bytes`` closes the stream without a word. Line by line, it also finds
# the end of a 400-byte head in 0.7 us where Tornado's ``\r?\n\r?\n`` takes 4.4.
_HEAD = re.compile(rb"\A(?:[\r\n]*+(?:[^\n]*+\n)*?\r?\n|[\s\S]{%d})" % (MAX_HEAD + 1))
_DIGITS = re.compile(r"[0-9]+")
_RID_LINE = re.compile(rb"(?im)^X-Request-Id:[ \t]*([^\s]+)[ \t]*\r?$")


class RequestTimeout(ApiError):
    status = 408
    code = "request_timeout"


class UriTooLong(ApiError):
    status = 414
    code = "uri_too_long"


class HeadersTooLarge(ApiError):
    status = 431
    code = "headers_too_large"


class Connection(HTTP1Connection):
    """One request/response exchange of a server connection (see the module
    docstring for what differs from Tornado's)."""

    _discard = False  # answered early; the (small) body is read and dropped
    _server: ServerConnection | None = None  # the connection's request loop
    _refused = False  # answered by the connection itself: nothing more is written

    # -- reading ---------------------------------------------------------------

    async def _read_message_inner(self, delegate, num_1xx: int = 0) -> bool:
        if self.is_client:
            return await super()._read_message_inner(delegate, num_1xx)
        need_delegate_close = False
        try:
            server = self._server
            if server is not None and server.next_head is not None:
                head_future, server.next_head = server.next_head, None
            else:
                head_future = self.stream.read_until_regex(_HEAD)
            if head_future.done():  # pipelined: the head is here already
                head = head_future.result()
            else:
                # Watched by the connection's idle sweep rather than a timer
                # per request (gen.with_timeout: ~4% of a REST request's CPU).
                idle = _IdleSweep.of(self.stream.io_loop)
                idle.watch(self, self.params.header_timeout or 3600)
                try:
                    head = await head_future
                finally:
                    idle.unwatch(self)
            if len(head) > MAX_HEAD:
                await self._refuse(_too_large_head(head), None)
                return False
            headers = None
            try:
                line, headers = self._parse_headers(head)
                start_line = httputil.parse_request_start_line(line)
                self._request_start_line = start_line
                self._request_headers = headers
                _check_framing(headers, self._max_body_size)
            except httputil.HTTPInputError as exc:
                await self._refuse(BadRequest(f"malformed request: {exc}"), headers, head)
                return False
            except ApiError as exc:
                await self._refuse(exc, headers)
                return False
            self._disconnect_on_finish = not self._can_keep_alive(start_line, headers)
            need_delegate_close = True
            try:
                with _ExceptionLoggingContext(app_log):
                    header_recv_future = delegate.headers_received(start_line, headers)
                    if header_recv_future is not None:
                        await header_recv_future
            except httputil.HTTPInputError as exc:  # e.g. over 1,000 query fields
                await self._refuse(BadRequest(f"malformed request: {exc}"), headers)
                return False
            if self.stream is None:  # detached (a websocket)
                need_delegate_close = False
                return False
            if self._write_finished and self._disconnect_on_finish:
                # Answered before the body, which is not worth reading (413):
                # the answer said Connection: close.
                await self._finish_future
                await self._linger()
                return False
            if headers.get("Expect") == "100-continue" and not self._write_finished:
                self.stream.write(b"HTTP/1.1 100 (Continue)\r\n\r\n")
            try:
                body_future = self._read_body(0, headers, delegate)
                if body_future is None:
                    pass
                elif self._body_buffered(headers):
                    # All there already (a small body comes with its headers):
                    # no timer (gen.with_timeout costs ~40 us per request).
                    await body_future
                else:
                    await gen.with_timeout(
                        self.stream.io_loop.time() + (self._body_timeout or 3600),
                        body_future,
                        quiet_exceptions=(iostream.StreamClosedError, httputil.HTTPInputError),
                    )
            except TimeoutError:
                await self._refuse(
                    RequestTimeout(f"request body not received within {self._body_timeout:g}s"),
                    headers,
                )
                return False
            except httputil.HTTPInputError as exc:
                await self._refuse(_body_error(exc), headers)
                return False
            self._read_finished = True
            if not self._write_finished:
                with _ExceptionLoggingContext(app_log):
                    delegate.finish()
                need_delegate_close = False
            if (
                not self._finish_future.done()
                and self.stream is not None
                and not self.stream.closed()
            ):
                self.stream.set_close_callback(self._on_connection_close)
                await self._finish_future
            if self.stream is None:
                return False
            if self._disconnect_on_finish and not self.stream.closed():
                # Answered early (the body has been dropped since) on a
                # connection the client asked to close.
                await self._linger()
                return False
        finally:
            if need_delegate_close:
                with _ExceptionLoggingContext(app_log):
                    delegate.on_connection_close()
            self._clear_callbacks()
        return True

    def _body_buffered(self, headers: httputil.HTTPHeaders) -> bool:
        length = headers.get("Content-Length")
        # IOStream's count of bytes read and not consumed yet (no public accessor).
        return length is not None and int(length) <= self.stream._read_buffer_size

    # -- writing ---------------------------------------------------------------

    def write_headers(self, start_line, headers, chunk=None):
        if self._refused:
            return _written()
        if not self.is_client and not self._read_finished and not self._disconnect_on_finish:
            # An answer before the request body was read: read a small
            # announced body and keep the connection, or say it closes.
            req = self._request_headers
            length = req.get("Content-Length")
            if (
                "Transfer-Encoding" in req
                or (length is not None and int(length) > DISCARD_LIMIT)
                # A client told "no" before its 100 Continue may never send
                # the body: its next request would be read as that body.
                or (length not in (None, "0") and "Expect" in req)
            ):
                self._disconnect_on_finish = True  # Tornado adds Connection: close
            else:
                self._discard = True
        return super().write_headers(start_line, headers, chunk)

    def write(self, chunk: bytes):
        if self._refused:
            return _written()
        return super().write(chunk)

    def finish(self) -> None:
        if self._refused:
            return
        super().finish()
        if self._discard and not self._read_finished:
            # Tornado's finish() gives up on a body it has not read; this
            # connection reads (and drops) it and carries on.
            self._disconnect_on_finish = False

    def _finish_request(self, future) -> None:
        if self.is_client or self._read_finished or self.stream is None:
            super()._finish_request(future)
            self._arm_next_head()
            return
        # The answer is out, the body is not read yet: _read_message_inner
        # reads it, then goes on or closes.
        self._clear_callbacks()
        if not self._finish_future.done():
            future_set_result_unless_cancelled(self._finish_future, None)

    def _arm_next_head(self) -> None:
        """Start reading the next request's head as soon as this answer is
        out, rather than two loop turns later when the request loop comes
        round. Tornado listens for reads between requests only to notice a
        close; a request arriving in that gap was read into the buffer and
        the socket taken out of epoll, then put back once the next head read
        began: two epoll_ctl calls and asyncio's reader bookkeeping per
        request under load. With the read pending, the request goes straight
        to it and the socket stays registered."""
        stream = self.stream
        server = self._server
        if (
            self.is_client
            or server is None
            or self._disconnect_on_finish
            or stream is None
            or stream.closed()
            or stream.reading()
            # A websocket takes the stream over after its 101.
            or self._request_headers is None
            or "Upgrade" in self._request_headers
        ):
            return
        head = stream.read_until_regex(_HEAD)
        head.add_done_callback(_retrieved)  # the loop may end before taking it
        server.next_head = head

    # -- refusing --------------------------------------------------------------

    async def _refuse(
        self, exc: ApiError, headers: httputil.HTTPHeaders | None, head: bytes = b""
    ) -> None:
        """Answer ``exc`` (unless an answer has been written) and close."""
        if headers is None:
            # Unparsable: the client's request id, if a line of the head has one.
            headers = httputil.HTTPHeaders()
            match = _RID_LINE.search(head[:MAX_HEAD])
            if match:
                headers["X-Request-Id"] = match.group(1).decode("latin1")
        line = self._request_start_line
        rid = web.request_id_from(headers.get("X-Request-Id")) or web.new_request_id()
        if not self._write_finished and self._response_start_line is None:
            self._refused = True
            self._write_finished = True
            body = orjson.dumps(exc.body())
            out = [
                f"HTTP/1.1 {exc.status} {http.HTTPStatus(exc.status).phrase}",
                f"Content-Type: {web.JSON_TYPE}",
                f"Content-Length: {len(body)}",
                "Connection: close",
                f"Date: {web.http_date()}",
                f"X-Request-Id: {rid}",
            ]
            origin = headers.get("Origin")
            cors = getattr(self.context, "chatd_cors", ())
            if origin and web.origin_allowed(origin, cors) and "\r" not in origin:
                out.append(f"Access-Control-Allow-Origin: {origin}")
                out.append("Access-Control-Allow-Credentials: true")
            data = ("\r\n".join(out) + "\r\n\r\n").encode("latin1", "replace") + body
            try:
                await self.stream.write(data)
            except iostream.StreamClosedError:
                pass
            web.access_log(
                line.method if line else "-",
                line.path.partition("?")[0][:200] if line else "-",
                exc.status,
                rid,
            )
        await self._linger()

    async def _linger(self) -> None:
        """Close after an answer while the client may still be sending: shut
        the write side, drop what arrives for a moment, then close (a close
        with unread data would reset the connection, answer and all)."""
        stream = self.stream
        if stream is None or stream.closed():
            return
        self._clear_callbacks()
        try:
            stream.socket.shutdown(socket.SHUT_WR)
        except OSError:
            stream.close()
            return
        deadline = stream.io_loop.time() + LINGER_SECONDS
        dropped = 0
        try:
            while dropped < LINGER_BYTES:
                chunk = await gen.with_timeout(
                    deadline,
                    stream.read_bytes(65536, partial=True),
                    quiet_exceptions=iostream.StreamClosedError,
                )
                dropped += len(chunk)
        except (TimeoutError, iostream.StreamClosedError):
            pass
        finally:
            self.close()


class ServerStream(iostream.IOStream):
    """Tornado's IOStream for chatd's plain (non-TLS) server connections,
    writing straight to the socket while nothing is queued.

    ``IOStream.write`` queues every piece, arms a Future with a done-callback
    (a loop callback per write) and only then sends it; for an answer or a
    websocket frame that the socket takes whole, which is nearly all of them,
    that bookkeeping was most of the write's cost (half of a fanout
    delivery's CPU). Here, when the write queue is empty (so the order
    holds), the data is sent at once and an already-resolved Future returned;
    what the socket does not take (EAGAIN, a partial send) goes through
    ``IOStream.write`` as before, and later writes queue behind it. Errors
    are left to ``IOStream.write``, which meets them again and closes the
    stream as it always does. Installed by chatd.server.HTTPServer.handle_stream
    (``stream.__class__``: the TCPServer builds the stream itself)."""

    def _handle_events(self, fd, events) -> None:
        """Tornado 6.6's ``BaseIOStream._handle_events``, but for one line:
        while no read is pending, Tornado stops listening for reads as soon
        as anything sits in its read buffer, and listens again once the
        buffer is read. A POST's body arrives with its head and waits in the
        buffer for the next loop turn, so every POST took the socket out of
        epoll and put it back (two ``epoll_ctl`` calls and asyncio's reader
        bookkeeping; ~5% of a send's CPU in the post profiles). Here reads
        stay on while the buffer holds at most :data:`KEEP_READING` bytes
        (a body chatd would read anyway); past that, as before, the client
        waits until chatd reads."""
        if self.closed():
            return
        try:
            if events & self.io_loop.READ:
                self._handle_read()
            if self.closed():
                return
            if events & self.io_loop.WRITE:
                self._handle_write()
            if self.closed():
                return
            if events & self.io_loop.ERROR:
                self.error = self.get_fd_error()
                self.io_loop.add_callback(self.close)
                return
            state = self.io_loop.ERROR
            if self.reading():
                state |= self.io_loop.READ
            if self.writing():
                state |= self.io_loop.WRITE
            if state == self.io_loop.ERROR and self._read_buffer_size <= KEEP_READING:
                state |= self.io_loop.READ  # (Tornado: == 0)
            if state != self._state:
                self._state = state
                self.io_loop.update_handler(self.fileno(), self._state)
        except iostream.UnsatisfiableReadError as e:
            gen_log.info("Unsatisfiable read, closing connection: %s", e)
            self.close(exc_info=e)
        except Exception as e:
            gen_log.error("Uncaught exception, closing connection.", exc_info=True)
            self.close(exc_info=e)
            raise

    def write(self, data):
        if self._write_buffer or self._connecting or self._closed or not data:
            return super().write(data)
        try:
            sent = self.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return super().write(data)  # IOStream's path closes it and says why
        if sent:
            self._total_write_index += sent
            self._total_write_done_index += sent
            if sent == len(data):
                self._maybe_add_error_listener()
                return _written()
            data = memoryview(data)[sent:]
        return super().write(data)


class _IdleSweep:
    """Closes connections that have waited too long for a request head (the
    server's ``idle_connection_timeout``, or a head that trickles in).

    Tornado arms a timer per request for this (``gen.with_timeout``: a
    future, a chained callback and a heap entry, created and cancelled each
    time). Here a connection waiting for a head is entered in a dict with its
    deadline, and one timer per event loop sweeps the dict every
    :data:`SWEEP_SECONDS`: a connection is closed between its deadline and a
    sweep later."""

    _by_loop: dict = {}

    @classmethod
    def of(cls, io_loop) -> _IdleSweep:
        sweep = cls._by_loop.get(io_loop)
        if sweep is None:
            sweep = cls._by_loop[io_loop] = cls(io_loop)
        return sweep

    def __init__(self, io_loop) -> None:
        self.io_loop = io_loop
        self.waiting: dict[Connection, float] = {}
        self._timer = None

    def watch(self, conn: Connection, timeout: float) -> None:
        self.waiting[conn] = self.io_loop.time() + timeout
        if self._timer is None:
            self._timer = self.io_loop.call_later(SWEEP_SECONDS, self._sweep)

    def unwatch(self, conn: Connection) -> None:
        self.waiting.pop(conn, None)

    def _sweep(self) -> None:
        self._timer = None
        now = self.io_loop.time()
        late = [conn for conn, deadline in self.waiting.items() if deadline <= now]
        for conn in late:
            self.waiting.pop(conn, None)
            conn.close()  # the pending head read ends with StreamClosedError
        if self.waiting:
            self._timer = self.io_loop.call_later(SWEEP_SECONDS, self._sweep)
        else:
            self._by_loop.pop(self.io_loop, None)


# A server stream keeps listening for reads while its buffer holds at most
# this much unread (ServerStream._handle_events): a REST body's limit.
KEEP_READING = web.MAX_BODY

# How often idle connections are looked at (so at most this late).
SWEEP_SECONDS = 1.0


class RequestContext(_HTTPRequestContext):
    """Tornado's per-connection context, skipping the proxy headers' work
    when a request carries none of them: Tornado otherwise validates the
    connection's own address again for every request (``is_valid_ip``, a
    ``getaddrinfo`` call: ~2% of a REST request's CPU)."""

    def _apply_xheaders(self, headers: httputil.HTTPHeaders) -> None:
        if (
            "X-Forwarded-For" in headers
            or "X-Real-Ip" in headers
            or "X-Scheme" in headers
            or "X-Forwarded-Proto" in headers
        ):
            super()._apply_xheaders(headers)


class ServerConnection(HTTP1ServerConnection):
    """Tornado's server connection, serving each request with :class:`Connection`."""

    next_head: asyncio.Future | None = None  # the next request's head, being read

    async def _server_request_loop(self, delegate) -> None:
        # Tornado 6.6's loop, with chatd's connection class.
        try:
            while True:
                conn = Connection(self.stream, False, self.params, self.context)
                conn._server = self
                request_delegate = delegate.start_request(self, conn)
                try:
                    ret = await conn.read_response(request_delegate)
                except (
                    iostream.StreamClosedError,
                    iostream.UnsatisfiableReadError,
                    asyncio.CancelledError,
                ):
                    return
                except Exception:
                    gen_log.error("Uncaught exception", exc_info=True)
                    conn.close()
                    return
                if not ret:
                    return
                await asyncio.sleep(0)
        finally:
            delegate.on_close(self)


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # a close while nobody waits: not worth a warning


def _too_large_head(head: bytes) -> ApiError:
    if b"\n" not in head[:MAX_HEAD]:
        return UriTooLong(f"request line is longer than {MAX_HEAD // 1024} KiB")
    return HeadersTooLarge(f"request line and headers are larger than {MAX_HEAD // 1024} KiB")


def _check_framing(headers: httputil.HTTPHeaders, max_body_size: int) -> None:
    """How the body is delimited must be unambiguous (RFC 9112, 6.3): else 400.
    Identical repeated Content-Length values count as one (as in Tornado)."""
    length = headers.get("Content-Length")
    if length is not None:
        values = {v.strip() for v in length.split(",")}
        if len(values) != 1:
            raise BadRequest("conflicting Content-Length headers")
        value = values.pop()
        if not _DIGITS.fullmatch(value):
            raise BadRequest("Content-Length must be a non-negative integer")
        if "Transfer-Encoding" in headers:
            raise BadRequest("Content-Length and Transfer-Encoding together")
        if int(value) > max_body_size:
            raise PayloadTooLarge(f"request body is larger than {web.MAX_BODY} bytes")
        headers["Content-Length"] = value
    te = headers.get("Transfer-Encoding")
    if te is not None and te.lower() != "chunked":
        raise BadRequest("Transfer-Encoding must be chunked")


def _body_error(exc: httputil.HTTPInputError) -> ApiError:
    if "too large" in str(exc) or "too long" in str(exc):
        return PayloadTooLarge(f"request body is larger than {web.MAX_BODY} bytes")
    return BadRequest(f"malformed request body: {exc}")


_WRITTEN: dict = {}  # event loop -> its resolved future (see _written)


def _written() -> asyncio.Future:
    """A resolved future for a write that is done, one per event loop: a done
    future keeps no callbacks (``add_done_callback`` schedules them at once)
    and cannot be cancelled, so every caller can share it (a new one per
    websocket frame was ~5% of a fanout delivery's CPU)."""
    loop = asyncio.get_running_loop()
    future = _WRITTEN.get(loop)
    if future is None:
        if len(_WRITTEN) > 16:  # loops of finished tests, say
            _WRITTEN.clear()
        future = _WRITTEN[loop] = loop.create_future()
        future.set_result(None)
    return future
