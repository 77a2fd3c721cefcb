"""The access line: one per request, formatted once, written once per loop turn.

Through :mod:`logging`, each request's line cost ~35 us of the event loop (a
LogRecord with its ``extra=`` fields, the Formatter's ``asctime``, the
handler's lock, and a ``write()`` + ``flush()`` system call per line): at the
default ``LOG_LEVEL=info`` that was ~20% of chatd's throughput on post to one
chat (docs/PERFORMANCE.md, "Logging"). Production servers keep the access log
off that path (nginx buffers it; uvicorn and gunicorn format it directly), and
so does chatd:

- the line is formatted here, with the same text
  (``<asctime> INFO chatd.access: <METHOD> <path> <status> <ms>ms rid=<id>``)
  or JSON object (the same keys as :class:`chatd.server.JsonFormatter`'s) as
  the logging module would produce, and passes the same secret masking;
- lines are collected and written by one ``write()`` at the end of the event
  loop turn that produced them (in pieces of at most ``PIPE_BUF`` bytes, whole
  lines each, so the lines of several processes sharing a pipe never mix);
- every other log record is written by the same :class:`LogHandler`, which
  first writes the waiting access lines, so the log keeps the order things
  happened in.

The fast path is taken only while the log is configured as chatd configured
it (:func:`chatd.server.setup_logging`: this handler alone on the root logger,
nothing on ``chatd.access``). Anything else (a test's log capture, an
embedding application's handlers) gets a normal ``LogRecord`` with the same
message and ``extra=`` fields, as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

_access = logging.getLogger("chatd.access")
_root = logging.getLogger()

# Lines of up to this many bytes are written by one write() each; POSIX makes
# a pipe write of at most PIPE_BUF (4096 on Linux) atomic.
_CHUNK = 4096


class LogHandler(logging.StreamHandler):
    """chatd's one handler: log records as usual, plus the buffered access lines."""

    def __init__(self, stream, json_format: bool, redact) -> None:
        super().__init__(stream)
        self.json_format = json_format
        self.redact = redact
        self._lines: list[str] = []
        self._size = 0
        self._second = -1
        self._stamp = ""

    # -- the access lines ------------------------------------------------------

    def access(
        self, level: int, method: str, path: str, status: int, rid: str, extra: dict
    ) -> None:
        now = time.time()
        if self.json_format:
            ms = int(now * 1000) % 1000
            record = {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{ms:03d}Z",
                "level": logging.getLevelName(level).lower(),
                "logger": "chatd.access",
                "msg": _message(method, path, status, extra.get("duration_ms"), rid),
                **extra,
            }
            line = json.dumps(record, default=str, ensure_ascii=False)
        else:
            second = int(now)
            if second != self._second:  # logging's asctime, formatted once a second
                self._second = second
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            ms = int((now - second) * 1000)
            message = _message(method, path, status, extra.get("duration_ms"), rid)
            line = f"{self._stamp},{ms:03d} {logging.getLevelName(level)} chatd.access: {message}"
        line = self.redact(line) + "\n"
        with self.lock:  # another thread's record may be writing the lines out
            first = not self._lines
            self._lines.append(line)
            self._size += len(line)
        if first:
            try:
                asyncio.get_running_loop().call_soon(self.write_waiting)
            except RuntimeError:  # no loop running: write it now
                self.write_waiting()
                return
        if self._size >= 65536:
            self.write_waiting()

    def write_waiting(self) -> None:
        """Write the access lines collected so far (also before any other record)."""
        with self.lock:
            lines = self._lines
            if not lines:
                return
            self._lines = []
            self._size = 0
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        stream = self.stream
        try:
            chunk: list[str] = []
            size = 0
            for line in lines:
                if size and size + len(line) > _CHUNK:
                    stream.write("".join(chunk))
                    stream.flush()
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            stream.write("".join(chunk))
            stream.flush()
        except Exception:  # a closed or broken stderr: dropped, as logging.Handler would
            pass

    # -- logging.Handler ---------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        if self._lines:
            self.write_waiting()
        super().emit(record)

    def flush(self) -> None:
        if self._lines:
            self.write_waiting()
        super().flush()


def _message(method: str, path: str, status: int, ms, rid: str) -> str:
    if ms is None:
        return f"{method} {path} {status} rid={rid}"
    return f"{method} {path} {status} {ms:.1f}ms rid={rid}"


def _fast_handler() -> LogHandler | None:
    handlers = _root.handlers
    if (
        len(handlers) == 1
        and type(handlers[0]) is LogHandler
        and _access.propagate
        and not _access.handlers
        and not _access.filters
        and not _root.filters
    ):
        return handlers[0]
    return None


def log(level: int, method: str, path: str, status: int, rid: str, extra: dict) -> None:
    """One access line (the caller has checked ``_access.isEnabledFor(level)``)."""
    handler = _fast_handler()
    if handler is not None and level >= handler.level and not handler.filters:
        handler.access(level, method, path, status, rid, extra)
        return
    ms = extra.get("duration_ms")
    if ms is None:
        _access.log(level, "%s %s %d rid=%s", method, path, status, rid, extra=extra)
    else:
        _access.log(level, "%s %s %d %.1fms rid=%s", method, path, status, ms, rid, extra=extra)


def enabled(level: int) -> bool:
    return _access.isEnabledFor(level)
