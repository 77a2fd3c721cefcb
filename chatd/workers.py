"""CHATD_WORKERS: several chatd processes on one port, one host.

One Python process uses one core. With CHATD_WORKERS=N the parent forks N
workers, each listening on the port with SO_REUSEPORT (the kernel spreads
new connections over them), forwards SIGTERM/SIGINT to them, and replaces a
worker that dies unexpectedly. The workers are ordinary chatd processes sharing
PostgreSQL and Redis, exactly as when they run on separate ports behind a
proxy (Socket.IO rooms span them through Redis).

Each connection stays on the worker that accepted it, so websocket clients
are fine; Socket.IO's HTTP long-polling (the browser client's first transport
unless ``transports: ["websocket"]``) needs every request of a session on one
process: use a sticky proxy in front for that (README, "Scaling out").
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable

log = logging.getLogger("chatd.workers")

# A worker that keeps dying is not restarted forever: at most this many
# restarts within RESTART_WINDOW seconds, then the parent gives up (exit 1)
# and the service manager decides.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


def supervise(count: int, worker: Callable[[], int]) -> int:
    """Run ``worker`` in ``count`` forked processes until told to stop."""
    children: dict[int, int] = {}
    stopping = False
    restarts: list[float] = []

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                code = worker() or 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for index in range(count):
        spawn(index)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("supervising %d workers: %s", count, ", ".join(map(str, children)))

    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            status = status or (1 if code not in (0, -signal.SIGTERM, -signal.SIGINT) else 0)
            continue
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < RESTART_WINDOW]
        if len(restarts) >= MAX_RESTARTS:
            log.error("worker %d (pid %d) exited with %s; too many restarts, stopping", index, pid,
                      code)  # fmt: skip
            forward(signal.SIGTERM, None)
            status = 1
            continue
        restarts.append(now)
        log.warning("worker %d (pid %d) exited with %s; starting another", index, pid, code)
        spawn(index)
    return status
