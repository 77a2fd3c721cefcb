"""Schema migrations: the numbered ``.sql`` files of ``sql/``, applied in order.

Bookkeeping follows dbmate: a ``schema_migrations`` table with one row per
applied file (its name and the SHA-256 of its text). Each file runs in its own
transaction together with its row, so a failing file leaves nothing behind. A
file whose text changed after it was applied is reported by name and stops the
run: it is never re-run silently. Two runs at once are safe: they take a
PostgreSQL advisory lock, so the second waits and then finds nothing to do.

This uses psycopg2 directly (synchronous): it runs from chatctl, and from
chatd before its event loop starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg2

FILE_RE = re.compile(r"^(\d+)_[A-Za-z0-9_-]+\.sql$")
# pg_advisory_lock key: the bytes "chatdmig" as a bigint.
LOCK_KEY = int.from_bytes(b"chatdmig", "big") & 0x7FFF_FFFF_FFFF_FFFF

TRACKING_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text        PRIMARY KEY,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


class MigrationError(Exception):
    """A migration cannot be applied; the message names the file."""


@dataclass(frozen=True)
class Migration:
    name: str
    path: Path
    checksum: str

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class State:
    name: str
    status: str  # applied | pending | changed | missing (applied, file gone)
    applied_at: str | None = None


def sql_dir() -> Path:
    """Where the migrations are: $CHATD_SQL_DIR, a source checkout's sql/, or
    the copy installed with the package (share/chatd/sql)."""
    env = os.environ.get("CHATD_SQL_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent / "sql"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "chatd" / "sql"


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    if not directory.is_dir():
        raise MigrationError(f"no migrations folder at {directory}")
    found = []
    for path in directory.iterdir():
        if path.suffix == ".sql" and FILE_RE.match(path.name):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found.append(Migration(path.name, path, digest))
    found.sort(key=lambda m: (int(FILE_RE.match(m.name).group(1)), m.name))
    return found


def _applied(cur) -> dict[str, tuple[str, str]]:
    cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not cur.fetchone()[0]:
        return {}
    cur.execute(
        "SELECT version, checksum, to_char(applied_at, 'YYYY-MM-DD HH24:MI:SS') "
        "FROM schema_migrations"
    )
    return {v: (c, at) for v, c, at in cur.fetchall()}


def status(dsn: str, directory: Path | None = None) -> list[State]:
    files = discover(directory)
    with contextlib.closing(_connect(dsn)) as conn, conn.cursor() as cur:
        applied = _applied(cur)
        conn.rollback()
    states = []
    for m in files:
        if m.name not in applied:
            states.append(State(m.name, "pending"))
        else:
            checksum, at = applied[m.name]
            states.append(State(m.name, "applied" if checksum == m.checksum else "changed", at))
    names = {m.name for m in files}
    states += [State(v, "missing", at) for v, (_, at) in sorted(applied.items()) if v not in names]
    return states


def pending(dsn: str, directory: Path | None = None) -> list[str]:
    return [s.name for s in status(dsn, directory) if s.status == "pending"]


def migrate(
    dsn: str,
    directory: Path | None = None,
    dry_run: bool = False,
    say: Callable[[str], None] = lambda _line: None,
) -> list[str]:
    """Apply the pending files in order; the names applied (or, dry, to apply)."""
    files = discover(directory)
    done: list[str] = []
    with contextlib.closing(_connect(dsn)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
            if not cur.fetchone()[0]:
                # Another run (an admin, or a chatd starting) is migrating: say
                # why we pause, then wait for it; it may leave nothing to do.
                say("waiting for another migration run to finish")
                cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            try:
                cur.execute(TRACKING_TABLE)
                applied = _applied(cur)
                for m in files:
                    if m.name in applied:
                        if applied[m.name][0] != m.checksum:
                            raise MigrationError(
                                f"{m.name} was changed after it was applied "
                                "(write a new migration instead of editing an applied one)"
                            )
                        continue
                    if dry_run:
                        say(f"would apply {m.name}")
                        done.append(m.name)
                        continue
                    say(f"applying {m.name}")
                    try:
                        cur.execute("BEGIN")
                        cur.execute(m.sql)
                        cur.execute(
                            "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                            (m.name, m.checksum),
                        )
                        cur.execute("COMMIT")
                    except psycopg2.Error as exc:
                        cur.execute("ROLLBACK")
                        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                        raise MigrationError(f"{m.name} failed: {first}") from None
                    done.append(m.name)
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    return done


def _connect(dsn: str):
    try:
        return psycopg2.connect(dsn, connect_timeout=10, application_name="chatd-migrate")
    except psycopg2.OperationalError as exc:
        first = (str(exc).strip().splitlines() or ["cannot connect"])[0]
        raise MigrationError(f"cannot connect to PostgreSQL: {first}") from None
