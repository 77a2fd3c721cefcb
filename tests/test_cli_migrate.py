"""chatctl migrate: applies, reports, and two admins at once are safe."""

import signal
import time
from urllib.parse import urlsplit

import psycopg2
import pytest

from chatd import migrations

from .clitools import chatctl_fixture, one_line_error, query  # noqa: F401


def test_migrate_applies_pending_files_then_has_nothing_to_do(chatctl, empty_database_url):
    dry = chatctl("migrate", "--dry-run", DATABASE_URL=empty_database_url)
    assert dry.exit_code == 0, dry.output
    assert "would apply 001_schema.sql" in dry.stdout
    assert query(empty_database_url, "SELECT to_regclass('chats')") == [(None,)]

    status = chatctl("migrate", "--status", DATABASE_URL=empty_database_url)
    assert status.stdout.split() == [
        "pending",
        "001_schema.sql",
        "pending",
        "002_conversations.sql",
        "pending",
        "003_search.sql",
    ]

    first = chatctl("migrate", DATABASE_URL=empty_database_url)
    assert first.exit_code == 0, first.output
    assert "applying 001_schema.sql" in first.stdout
    assert "applying 002_conversations.sql" in first.stdout
    assert "applying 003_search.sql" in first.stdout
    assert "applied 3 migration(s)" in first.stdout
    assert query(empty_database_url, "SELECT to_regclass('chats') IS NOT NULL") == [(True,)]

    again = chatctl("migrate", DATABASE_URL=empty_database_url)
    assert again.exit_code == 0
    assert "nothing to apply" in again.stdout
    status = chatctl("migrate", "--status", DATABASE_URL=empty_database_url)
    assert status.stdout.split()[:2] == ["applied", "001_schema.sql"]


@pytest.mark.slow
def test_two_admins_migrating_at_once_both_succeed_and_each_file_applies_once(
    chatctl, empty_database_url
):
    # Hold the migration lock so that both processes are surely waiting on it
    # at the same time, then let them race.
    holder = psycopg2.connect(empty_database_url)
    holder.autocommit = True
    procs = []
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (migrations.LOCK_KEY,))
            procs = [chatctl.spawn("migrate", DATABASE_URL=empty_database_url) for _ in range(2)]
            deadline = time.monotonic() + 30
            while True:
                cur.execute(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                    " WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = %s",
                    (urlsplit(empty_database_url).path.lstrip("/"),),
                )
                if cur.fetchone()[0] == 2:
                    break
                assert time.monotonic() < deadline, "the two migrations never waited"
                time.sleep(0.05)
            cur.execute("SELECT pg_advisory_unlock(%s)", (migrations.LOCK_KEY,))
        codes = [p.proc.wait(60) for p in procs]
        for p in procs:
            p.finish(signal.SIGTERM)
    finally:
        for p in procs:
            p.kill()
        holder.close()
    assert codes == [0, 0], [p.err for p in procs]
    outputs = sorted("\n".join(p.out) for p in procs)
    assert sum("applying 001_schema.sql" in o for o in outputs) == 1, outputs
    assert sum("nothing to apply" in o for o in outputs) == 1, outputs
    assert all("waiting for another migration run" in o for o in outputs), outputs
    assert query(empty_database_url, "SELECT version FROM schema_migrations ORDER BY version") == [
        ("001_schema.sql",),
        ("002_conversations.sql",),
        ("003_search.sql",),
    ]


def test_migrate_without_a_database_and_no_embedded_chatd_says_so(chatctl, tmp_path):
    # No database configured means chatd's embedded default; with no chatd
    # running there, say so in one line instead of a socket error.
    result = chatctl(
        "migrate", DATABASE_URL=None, ACCESS_TOKEN_SECRET=None, CHATD_DATA_DIR=str(tmp_path)
    )
    assert result.exit_code == 1
    assert "no database configured" in result.stderr
    assert "embedded PostgreSQL" in result.stderr and str(tmp_path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_migrate_against_an_unreachable_database_fails_with_one_line(chatctl):
    done = chatctl.process("migrate", DATABASE_URL="postgresql://postgres@127.0.0.1:1/nope")
    assert done.returncode == 1
    assert "cannot connect to PostgreSQL" in one_line_error(done.stderr)
