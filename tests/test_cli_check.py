"""chatctl check: one line per check, exit 1 when any fails."""

from .clitools import chatctl_fixture  # noqa: F401


def _lines(result) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()}


def test_check_passes_on_a_ready_deployment(chatctl):
    result = chatctl("check")
    assert result.exit_code == 0, result.output
    assert _lines(result) == {"config": "ok", "postgres": "ok", "redis": "ok", "schema": "ok"}


def test_check_reports_pending_migrations(chatctl, empty_database_url):
    result = chatctl("check", DATABASE_URL=empty_database_url)
    assert result.exit_code == 1
    assert _lines(result)["schema"] == "FAIL"
    assert "chatctl migrate" in result.stdout


def test_check_reports_unreachable_stores(chatctl):
    result = chatctl(
        "check",
        DATABASE_URL="postgresql://postgres@127.0.0.1:1/nope",
        REDIS_URL="redis://127.0.0.1:1/0",
        DB_TIMEOUT="1",
        REDIS_TIMEOUT="0.5",
    )
    assert result.exit_code == 1
    lines = _lines(result)
    assert lines["config"] == "ok"
    assert lines["postgres"] == lines["redis"] == lines["schema"] == "FAIL"


def test_check_reports_bad_configuration(chatctl):
    result = chatctl("check", LOG_LEVEL="loud")
    assert result.exit_code == 1
    assert result.stdout.startswith("FAIL  config")
    assert "LOG_LEVEL" in result.stdout


def test_every_command_has_help_with_an_example(chatctl):
    from cli.main import cli

    def walk(group, path):
        for name, command in group.commands.items():
            yield [*path, name]
            if hasattr(command, "commands"):
                yield from walk(command, [*path, name])

    paths = list(walk(cli, []))
    assert len(paths) >= 11
    for path in paths:
        result = chatctl(*path, "--help")
        assert result.exit_code == 0, path
        assert "Example" in result.stdout, path


def test_debug_shows_the_traceback_that_is_otherwise_one_line(chatctl):
    quiet = chatctl.process("chats", "show", "no-such-chat-here")
    assert quiet.returncode == 1
    assert quiet.stderr.strip() == "Error: chat 'no-such-chat-here' not found"
    loud = chatctl.process("--debug", "chats", "show", "no-such-chat-here")
    assert loud.returncode == 1
    assert "Traceback" in loud.stderr
