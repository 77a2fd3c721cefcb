"""Faults the tests own: a TCP proxy they can cut, and a private redis-server.

The machine's PostgreSQL and Redis are shared, so fault tests never stop or
reconfigure them. Instead chatd talks to them through :class:`TcpProxy`, which
the test cuts (every open connection reset, new ones refused, as when the
server restarts or the host is unreachable) or blackholes (connections accepted
and open ones kept, but no byte goes through: a network partition) and then
restores. :class:`RedisServer` is a redis-server of the test's own on a free
port, stopped and started at will.

The proxy runs its own asyncio loop in a thread, so it keeps forwarding while
the test's loop is blocked (ChatdProcess.start waits synchronously).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

UP, RESET, BLACKHOLE = "up", "reset", "blackhole"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed or restarted server does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Listens on 127.0.0.1 and forwards to ``target_host:target_port``, or to
    the Unix socket ``target_host`` when no port is given (the embedded
    PostgreSQL listens only on one)."""

    def __init__(self, target_host: str, target_port: int | None):
        self.target = target_host if target_port is None else (target_host, target_port)
        self.port = free_port()
        self.mode = UP
        self.accepted = 0
        self._conns: set[_Conn] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    # -- control (from the test's thread) ---------------------------------------

    def cut(self, mode: str = RESET) -> None:
        """RESET: reset every open connection and refuse new ones (the server is
        down or restarting). BLACKHOLE: let nothing through, answer nothing."""
        self._call(self._set_mode, mode)

    def restore(self) -> None:
        self._call(self._set_mode, UP)

    def close(self) -> None:
        self._call(self._shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, fn, *args) -> None:
        asyncio.run_coroutine_threadsafe(fn(*args), self._loop).result(5)

    # -- the proxy (its own loop) --------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == RESET:
            for conn in list(self._conns):
                _abort(conn.client)
                if conn.upstream is not None:
                    _abort(conn.upstream)
            self._conns.clear()

    async def _shutdown(self) -> None:
        self._server.close()
        await self._set_mode(RESET)
        # Every connection's task ends here, not destroyed pending with the
        # loop ("Task was destroyed but it is pending! ... _client()").
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == RESET:
            _abort(writer)
            return
        conn = _Conn(writer)
        self._conns.add(conn)
        try:
            if self.mode == BLACKHOLE:
                await reader.read()  # hold it open, answer nothing
                return
            if isinstance(self.target, str):
                up_reader, conn.upstream = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, conn.upstream = await asyncio.open_connection(*self.target)
            await asyncio.gather(
                self._pipe(conn, reader, conn.upstream, to_server=True),
                self._pipe(conn, up_reader, writer, to_server=False),
                return_exceptions=True,
            )
        except OSError:
            pass
        finally:
            self._conns.discard(conn)
            for w in (writer, conn.upstream):
                if w is not None:
                    w.close()

    async def _pipe(self, conn: _Conn, reader, writer, to_server: bool) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                # A partition: bytes go nowhere for now (polled: modes change rarely).
                while self.mode == BLACKHOLE:
                    await asyncio.sleep(0.05)
                if self.mode == RESET:
                    break
                if conn.stale:
                    if to_server:  # the new server knows nothing of this connection
                        _abort(conn.client)
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            if conn.stale:
                return  # the server vanished; the client must not hear of it yet
            raise
        if conn.stale and not to_server:
            return
        with contextlib.suppress(OSError):
            writer.write_eof()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def restart_behind(self) -> None:
        """The server restarted and its resets never reached the client (a
        failover, a partition): every open connection is dead, and the client
        finds out only when it next uses it (it is reset then). New connections
        reach the server as usual."""
        self._call(self._restart_behind)

    async def _restart_behind(self) -> None:
        for conn in list(self._conns):
            conn.stale = True
            if conn.upstream is not None:
                _abort(conn.upstream)


class _Conn:
    __slots__ = ("client", "stale", "upstream")

    def __init__(self, client: asyncio.StreamWriter):
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.stale = False


class RedisServer:
    """A private redis-server on a free port (no persistence)."""

    def __init__(self):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="chatd-test-redis-")
        self.proc: subprocess.Popen | None = None
        self.extra: list[str] = []  # more redis-server arguments

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", self.dir, *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterServers:
    """A real 3-master Redis Cluster of the tests' own: three redis-server with
    ``cluster-enabled yes`` on free ports in a temporary folder, joined by
    ``redis-cli --cluster create`` (no replicas)."""

    def __init__(self, masters: int = 3):
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed")
        self.cli = cli
        self.servers = [RedisServer() for _ in range(masters)]

    @property
    def nodes(self) -> str:
        """REDIS_CLUSTER_NODES for chatd."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def start(self, timeout: float = 30) -> RedisClusterServers:
        for server in self.servers:
            # The cluster bus listens on port + 10000: both must be free.
            while server.port > 55000 or not _free(server.port + 10000):
                server.port = free_port()
            server.extra = ["--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
                            "--cluster-config-file", f"{server.dir}/nodes.conf"]  # fmt: skip
            server.start()
        subprocess.run(
            [self.cli, "--cluster", "create",
             *(f"127.0.0.1:{s.port}" for s in self.servers), "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        for server in self.servers:
            while True:
                info = subprocess.run(
                    [self.cli, "-p", str(server.port), "cluster", "info"],
                    capture_output=True, text=True, timeout=5,
                ).stdout  # fmt: skip
                if "cluster_state:ok" in info:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Redis Cluster not ready: {info}")
                time.sleep(0.1)
        return self

    def close(self) -> None:
        for server in self.servers:
            server.close()


class PostgresCluster:
    """A private PostgreSQL cluster (initdb + pg_ctl) on a free port, for a
    real restart; run as the postgres user when the tests run as root."""

    def __init__(self):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise FileNotFoundError("no /usr/lib/postgresql/*/bin/initdb")
        self.bin = Path(found[-1]).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="chatd-test-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "pg.log"
        self._as = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=timeout, cwd=self.dir
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}\n{done.stderr}")

    def _ctl(self, *args: str) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c shared_buffers=16MB -c max_connections=40"
        )
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-o", options, "-w", "-t", "30", *args)  # fmt: skip

    def start(self) -> PostgresCluster:
        if not self.data.exists():
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                      "--auth=trust", "-E", "UTF8", "--no-sync")  # fmt: skip
        self._ctl("start")
        return self

    def restart(self) -> None:
        """A fast restart: sessions are terminated, the server is back in ~1 s."""
        self._ctl("-m", "fast", "restart")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ctl("-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
