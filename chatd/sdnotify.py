"""systemd's readiness protocol (sd_notify(3)), which is one datagram.

``Type=notify`` units get ``NOTIFY_SOCKET``: a filesystem path, or an abstract
socket written with a leading ``@``. chatd sends ``READY=1`` once it listens,
``STOPPING=1`` when it begins to drain, and ``WATCHDOG=1`` every half
``WATCHDOG_USEC`` when the unit sets ``WatchdogSec=``. Without
``NOTIFY_SOCKET`` every call is a no-op, so this costs nothing elsewhere.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("chatd.sdnotify")


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``); True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":  # abstract namespace: a leading NUL byte
        address = "\0" + address[1:]
    elif address[0] != "/":
        log.warning("NOTIFY_SOCKET %r is neither a path nor @abstract: ignored", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify %s failed: %s", state.split("=")[0], exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half the unit's WatchdogSec), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) <= 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # meant for another process
    return int(usec) / 1_000_000 / 2
