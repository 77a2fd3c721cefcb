"""Migrations (chatd/migrations.py and `chatctl migrate`): in order into an
empty database, each once, changed files reported by name, --status and
--dry-run, concurrent runs, and chatd refusing an unmigrated database."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import psycopg2
import pytest
from click.testing import CliRunner

from chatd import migrations
from cli.main import cli

from .helpers import ROOT, SECRET
from .helpers import pg_query as pg


@pytest.fixture
def sql_copy(tmp_path):
    """A private copy of sql/001 plus a second migration, for CHATD_SQL_DIR
    (the mechanism under test; the real 002 has its own tests below)."""
    directory = tmp_path / "sql"
    directory.mkdir()
    shutil.copy(ROOT / "sql" / "001_schema.sql", directory)
    (directory / "002_extra.sql").write_text("CREATE TABLE extra_test (id int);\n")
    (directory / "README.txt").write_text("not a migration")
    (directory / "notes.sql").write_text("-- no number: not a migration")
    return directory


def chatctl(args: list[str], url: str, sql_dir) -> object:
    env = {"DATABASE_URL": url, "ACCESS_TOKEN_SECRET": SECRET, "CHATD_SQL_DIR": str(sql_dir)}
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def test_migrate_applies_in_order_into_an_empty_database_then_nothing(empty_database_url, sql_copy):
    first = chatctl(["migrate"], empty_database_url, sql_copy)
    assert first.exit_code == 0, first.output
    assert "applying 001_schema.sql" in first.output
    assert first.output.index("001_schema.sql") < first.output.index("002_extra.sql")
    assert "applied 2 migration(s)" in first.output
    applied = pg(empty_database_url, "SELECT version FROM schema_migrations ORDER BY applied_at")
    assert applied == [("001_schema.sql",), ("002_extra.sql",)]
    tables = {r[0] for r in pg(empty_database_url,
              "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}  # fmt: skip
    assert {"chats", "chat_members", "messages", "extra_test", "schema_migrations"} <= tables

    again = chatctl(["migrate"], empty_database_url, sql_copy)
    assert again.exit_code == 0
    assert "nothing to apply" in again.output
    assert "applying" not in again.output


def test_status_and_dry_run(empty_database_url, sql_copy):
    status = chatctl(["migrate", "--status"], empty_database_url, sql_copy)
    assert status.exit_code == 0, status.output
    assert status.output.split() == ["pending", "001_schema.sql", "pending", "002_extra.sql"]

    dry = chatctl(["migrate", "--dry-run"], empty_database_url, sql_copy)
    assert dry.exit_code == 0
    assert "would apply 001_schema.sql" in dry.output and "would apply 002_extra.sql" in dry.output
    assert pg(empty_database_url, "SELECT to_regclass('chats')") == [(None,)]

    (sql_copy / "002_extra.sql").rename(sql_copy / "002_extra.sql.off")
    assert chatctl(["migrate"], empty_database_url, sql_copy).exit_code == 0
    (sql_copy / "002_extra.sql.off").rename(sql_copy / "002_extra.sql")
    status = chatctl(["migrate", "--status"], empty_database_url, sql_copy)
    lines = status.output.strip().splitlines()
    assert lines[0].split()[:2] == ["applied", "001_schema.sql"]
    assert lines[1].split() == ["pending", "002_extra.sql"]
    dry = chatctl(["migrate", "--dry-run"], empty_database_url, sql_copy)
    assert "would apply 002_extra.sql" in dry.output and "001" not in dry.output
    assert pg(empty_database_url, "SELECT to_regclass('extra_test')") == [(None,)]


def test_a_changed_applied_file_is_reported_by_name(empty_database_url, sql_copy):
    assert chatctl(["migrate"], empty_database_url, sql_copy).exit_code == 0
    (sql_copy / "002_extra.sql").write_text("CREATE TABLE extra_test (id bigint);\n")
    (sql_copy / "003_more.sql").write_text("CREATE TABLE more_test (id int);\n")
    result = CliRunner().invoke(
        cli,
        ["migrate"],
        env={"DATABASE_URL": empty_database_url, "ACCESS_TOKEN_SECRET": SECRET,
             "CHATD_SQL_DIR": str(sql_copy)},
    )  # fmt: skip
    assert result.exit_code == 1
    assert "002_extra.sql" in result.output and "changed" in result.output
    # Nothing after it ran.
    assert pg(empty_database_url, "SELECT to_regclass('more_test')") == [(None,)]
    status = CliRunner().invoke(
        cli,
        ["migrate", "--status"],
        env={"DATABASE_URL": empty_database_url, "CHATD_SQL_DIR": str(sql_copy),
             "ACCESS_TOKEN_SECRET": SECRET},
    )  # fmt: skip
    assert status.exit_code == 1
    assert "changed  002_extra.sql" in status.output
    assert "pending  003_more.sql" in status.output


def test_a_failing_migration_leaves_nothing_behind(empty_database_url, sql_copy):
    (sql_copy / "002_extra.sql").write_text("CREATE TABLE half (id int);\nSELECT 1/0;\n")
    with pytest.raises(migrations.MigrationError, match=r"002_extra\.sql"):
        migrations.migrate(empty_database_url, sql_copy)
    assert pg(empty_database_url, "SELECT to_regclass('half')") == [(None,)]
    assert pg(empty_database_url, "SELECT version FROM schema_migrations") == [("001_schema.sql",)]


def test_two_concurrent_migrate_runs_apply_each_file_once(empty_database_url, sql_copy):
    (sql_copy / "003_slow.sql").write_text("SELECT pg_sleep(0.3); CREATE TABLE slow_test (id int);")
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run():
        try:
            results.append(migrations.migrate(empty_database_url, sql_copy))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(results, key=len) == [[], ["001_schema.sql", "002_extra.sql", "003_slow.sql"]]
    assert pg(empty_database_url, "SELECT count(*) FROM schema_migrations") == [(3,)]


@pytest.mark.slow
def test_chatd_refuses_to_start_on_an_unmigrated_database(empty_database_url, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DB_", "REDIS_", "CHAT", "DATABASE_", "ACCESS_"))}  # fmt: skip
    env.update({"DATABASE_URL": empty_database_url, "ACCESS_TOKEN_SECRET": SECRET,
                "CHATPORT": "0"})  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "chatd"],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "chatctl migrate" in lines[0] and "001_schema.sql" in lines[0]
    assert "listening" not in result.stderr


# -- the upgrade to version 2 (sql/002_conversations.sql) -----------------------


def test_upgrading_a_populated_v1_database_gives_every_message_a_version(
    empty_database_url, tmp_path
):
    """A version 1 database with chats, edits and deletes in it: after 002,
    every message has a version, distinct within its chat, none above the
    chat's, whose counter moved past them all (so a page cached by version 1
    is never served again), and chatd's rules hold on the upgraded rows."""
    v1 = tmp_path / "v1"
    v1.mkdir()
    shutil.copy(ROOT / "sql" / "001_schema.sql", v1)
    assert migrations.migrate(empty_database_url, v1) == ["001_schema.sql"]
    pg(
        empty_database_url,
        """INSERT INTO chats (id, title, created_by, last_seq, version) VALUES
               ('a', 'A', 'alice', 3, 5), ('b', 'B', 'carol', 2, 1), ('empty', 'E', 'x', 0, 0);
           INSERT INTO chat_members (chat_id, user_id, role) VALUES ('a', 'alice', 'owner');
           INSERT INTO messages (chat_id, seq, sender_id, content, deleted, edited_at) VALUES
               ('a', 1, 'alice', 'one', false, now()), ('a', 2, 'bob', NULL, true, NULL),
               ('a', 3, 'alice', 'three', false, NULL),
               ('b', 1, 'carol', 'x', false, NULL), ('b', 2, 'carol', 'y', false, NULL)""",
    )
    shutil.copy(ROOT / "sql" / "002_conversations.sql", v1)
    assert migrations.migrate(empty_database_url, v1) == ["002_conversations.sql"]
    rows = pg(empty_database_url, "SELECT chat_id, seq, version FROM messages ORDER BY 1, 2")
    # Above each chat's old version, in seq order.
    assert rows == [("a", 1, 6), ("a", 2, 7), ("a", 3, 8), ("b", 1, 2), ("b", 2, 3)]
    chats = pg(empty_database_url, "SELECT id, version FROM chats ORDER BY id")
    assert chats == [("a", 8), ("b", 3), ("empty", 0)]
    defaults = pg(
        empty_database_url,
        "SELECT DISTINCT reply_to, reply_count, reactions::text, pinned_at FROM messages",
    )
    assert defaults == [(None, 0, "[]", None)]
    # A version 1 writer that sets no version gets the chat's next one.
    pg(
        empty_database_url,
        "INSERT INTO messages (chat_id, seq, sender_id, content) VALUES ('a', 4, 'alice', 'v1')",
    )
    assert pg(empty_database_url, "SELECT version FROM messages WHERE seq = 4") == [(9,)]
    assert pg(empty_database_url, "SELECT version FROM chats WHERE id = 'a'") == [(9,)]
    # One change, one version: the index refuses two messages of a chat at one.
    with pytest.raises(psycopg2.errors.UniqueViolation):
        pg(empty_database_url, "UPDATE messages SET version = 6 WHERE chat_id = 'a' AND seq = 3")


# -- the upgrade to search, mentions and direct chats (sql/003_search.sql) ----


def test_upgrading_a_populated_v2_database_indexes_its_messages_for_search(
    empty_database_url, tmp_path
):
    """A version 2 database with messages (accented, deleted, edited): after
    003, the live ones are found by search with accents and case folded, the
    tombstone is not, every chat is a group chat with no mentions yet, every
    chat's version moved (pages cached without "mentions" are never served),
    and the feed trigger keeps mentions from then on."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    for name in ("001_schema.sql", "002_conversations.sql"):
        shutil.copy(ROOT / "sql" / name, v2)
    assert migrations.migrate(empty_database_url, v2) == [
        "001_schema.sql",
        "002_conversations.sql",
    ]
    pg(
        empty_database_url,
        """INSERT INTO chats (id, title, created_by) VALUES ('a', 'A', 'alice');
           INSERT INTO chat_members (chat_id, user_id, role)
                VALUES ('a', 'alice', 'owner'), ('a', 'bob', 'member');
           INSERT INTO messages (chat_id, seq, sender_id, content, deleted) VALUES
               ('a', 1, 'alice', 'Crème BRÛLÉE tonight', false),
               ('a', 2, 'bob', NULL, true),
               ('a', 3, 'alice', 'plain words', false);
           UPDATE chats SET last_seq = 3 WHERE id = 'a';""",
    )
    before = pg(empty_database_url, "SELECT version FROM chats WHERE id = 'a'")[0][0]
    assert migrations.migrate(empty_database_url) == ["003_search.sql"]
    assert pg(empty_database_url, "SELECT version FROM chats WHERE id = 'a'") == [(before + 1,)]
    assert pg(empty_database_url, "SELECT DISTINCT kind FROM chats") == [("group",)]
    found = pg(
        empty_database_url,
        "SELECT seq FROM messages WHERE search @@ websearch_to_tsquery('simple', 'creme brulee')",
    )
    assert found == [(1,)]
    assert pg(empty_database_url, "SELECT seq FROM messages WHERE search IS NULL") == [(2,)]
    assert pg(empty_database_url, "SELECT DISTINCT mentions FROM messages") == [([],)]
    # The trigger keeps the feed from the mentions column, whoever writes it.
    pg(empty_database_url, "UPDATE messages SET mentions = '{bob}' WHERE seq = 3")
    assert pg(empty_database_url, "SELECT user_id, seq FROM mentions") == [("bob", 3)]
    pg(empty_database_url, "UPDATE messages SET mentions = '{}' WHERE seq = 3")
    assert pg(empty_database_url, "SELECT count(*) FROM mentions") == [(0,)]
