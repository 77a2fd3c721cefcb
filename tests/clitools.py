"""Fixtures and helpers for the chatctl tests: run chatctl in-process with
click's CliRunner, or as a real process (the installed console script), with
the test run's database, Redis prefix and Socket.IO channel.

Each tests/test_cli_*.py imports the fixture (``chatctl_fixture``, used as
``chatctl``), so the shared conftest.py stays as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cli.main import cli

from .conftest import deployment_env
from .helpers import pg_query


def chatctl_env(database_url: str, redis_prefix: str) -> dict[str, str]:
    """The settings chatctl needs to work on the same deployment as the
    ``settings``/``spawn`` fixtures (same database, prefix and channel)."""
    return {**deployment_env(database_url, redis_prefix), "LOG_LEVEL": "warning"}


# Variables of the developer's environment that would change what chatctl
# connects to; every test states its own.
_CLEARED = (
    "DB_HOST",
    "DB_PORT",
    "DB_USER",
    "DB_NAME",
    "DB_PASSWORD",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "CHATD_ENV_FILE",
    "JWT_AUDIENCE",
    "JWT_ISSUER",
)


class Chatctl:
    """``chatctl(*args, **env_overrides)`` in-process (CliRunner); ``.spawn``
    and ``.process`` for the real console script."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.env = env
        self.cwd = cwd

    def __call__(self, *args: str, input: str | None = None, **env) -> Result:
        full = {name: None for name in _CLEARED}
        full.update(self.env)
        full.update(env)
        result = CliRunner().invoke(cli, list(args), env=full, input=input)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # a bug, not an exit code: show its traceback
        return result

    def command(self) -> list[str]:
        script = shutil.which("chatctl", path=str(Path(sys.executable).parent))
        return [script] if script else [sys.executable, "-m", "cli.main"]

    def process_env(self, **env) -> dict[str, str]:
        full = {k: v for k, v in os.environ.items() if k not in _CLEARED}
        full.pop("DATABASE_URL", None)
        full.update(self.env)
        full.update({k: v for k, v in env.items() if v is not None})
        for k, v in env.items():
            if v is None:
                full.pop(k, None)
        return full

    def process(self, *args: str, timeout: float = 60, **env) -> subprocess.CompletedProcess:
        """Run chatctl as a process to its end."""
        return subprocess.run(
            [*self.command(), *args],
            env=self.process_env(**env),
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def spawn(self, *args: str, **env) -> LineReader:
        """Start chatctl as a process and read its output as it comes."""
        proc = subprocess.Popen(
            [*self.command(), *args],
            env=self.process_env(**env),
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return LineReader(proc)


class LineReader:
    """A running process whose stdout and stderr lines are collected by threads."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, timeout: float = 20, what: str = "output") -> None:
        """Block until ``predicate(self)`` holds (poll; for sync tests)."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if self.proc.poll() is not None and not predicate(self):
                time.sleep(0.2)  # let the pumps drain
                if predicate(self):
                    return
                raise AssertionError(f"chatctl exited {self.proc.returncode}: {self.err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} in {timeout}s: out={self.out} err={self.err}")
            time.sleep(0.05)

    def finish(self, sig: int, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(name="chatctl")
def chatctl_fixture(database_url, redis_prefix, tmp_path, monkeypatch) -> Chatctl:
    # Not the checkout: a developer's .env there must not leak in.
    monkeypatch.chdir(tmp_path)
    return Chatctl(chatctl_env(database_url, redis_prefix), tmp_path)


query = pg_query  # the tests' one way to read PostgreSQL directly


def one_line_error(text: str) -> str:
    """The error of a failed command: exactly one non-empty line, no traceback."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]
