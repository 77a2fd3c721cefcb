"""Migrations (chatd/migrations.py and `chatctl migrate`): in order into an
empty database, each once, changed files reported by name, --status and
--dry-run, concurrent runs, and chatd refusing an unmigrated database."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner

from chatd import migrations
from cli.main import cli

from .helpers import ROOT, SECRET
from .helpers import pg_query as pg


@pytest.fixture
def sql_copy(tmp_path):
    """A private copy of sql/ plus a second migration, for CHATD_SQL_DIR."""
    directory = tmp_path / "sql"
    shutil.copytree(ROOT / "sql", directory)
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
