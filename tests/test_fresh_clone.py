"""A newcomer's first hour, for real: a fresh clone of this repository, and
the README's two commands in it, as the README says.

One test, because it pays for one fresh .venv (pip installs requirements.lock
from the local pip cache: about two minutes, most of this test's cost):

1. ``./scripts/run.sh --help`` prints usage and installs and starts nothing;
2. ``./scripts/test.sh`` (on one small test module, to bound the cost) installs
   the locked versions and runs pytest, without setuptools' warnings;
3. ``./scripts/run.sh`` then starts chatd on the embedded default, and its
   first lines are the README's sample (times, paths and the port aside);
   Ctrl-C stops it and its servers.

It clones the committed HEAD: uncommitted changes are not what a newcomer gets.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


def normalise(line: str) -> str:
    """A log line with what varies from run to run replaced: the time, the
    listening address, paths, durations, a non-default data folder's prefix."""
    line = STAMP.sub(lambda m: "<ts> " + m.group(0).split(" ", 2)[2], line)
    line = re.sub(r"https?://[^\s]+", "<url>", line)
    line = re.sub(r"CHATD_DATA_DIR=\S+ ", "", line)
    line = re.sub(r"/[^\s,()]+", "<path>", line)
    return re.sub(r"\(\d+\.\ds", "(<secs>", line)


def readme_sample(after: str, count: int | None = None) -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index(after) :]
    block = block[block.index("```\n") + 4 :]
    lines = block[: block.index("```")].strip().splitlines()
    return [normalise(line) for line in lines[:count]]


def _root_only(line: str) -> bool:
    # As root (the README says so), the first start may create the user
    # PostgreSQL runs as, and make folders searchable for it.
    return "creating system user" in line or "searchable (o+x)" in line


@pytest.fixture
def clone():
    folder = Path(tempfile.mkdtemp(prefix="chatd-clone-"))
    subprocess.run(["git", "clone", "-q", str(ROOT), str(folder / "chatd")], check=True)
    yield folder / "chatd"
    shutil.rmtree(folder, ignore_errors=True)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DB_", "REDIS_", "VIRTUAL_ENV", "PYTEST"))}  # fmt: skip
    for name in ("DATABASE_URL", "ACCESS_TOKEN_SECRET", "CHATD_ENV_FILE", "CHATD_DATA_DIR"):
        env.pop(name, None)
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_fresh_clone_runs_the_readme_commands_as_the_readme_says(clone):
    # 1. --help: usage, exit 0, nothing installed or started.
    helped = subprocess.run(
        ["./scripts/run.sh", "--help"], cwd=clone, env=_env(), capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert helped.returncode == 0, helped
    assert helped.stdout.startswith("Usage: ./scripts/run.sh")
    for word in ("CHATPORT", "FRONTENDADDRES", "CHATD_DATA_DIR", "requirements.lock"):
        assert word in helped.stdout, word
    assert not (clone / ".venv").exists()

    # 2. test.sh: installs the lock, then runs pytest (one module: bounded cost).
    tested = subprocess.run(
        ["./scripts/test.sh", "-q", "-p", "no:cacheprovider", "tests/test_api_reference.py"],
        cwd=clone, env=_env(), capture_output=True, text=True, timeout=780,
    )  # fmt: skip
    output = tested.stdout + tested.stderr
    assert tested.returncode == 0, output[-3000:]
    assert re.search(r"\b5 passed\b", output), output[-3000:]
    assert "BuildBackendWarning" not in output and "SetuptoolsDeprecationWarning" not in output
    assert "warning" not in tested.stdout.lower(), tested.stdout[-3000:]
    # What is installed is what the lock pins.
    pins = dict(
        re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (clone / "requirements.lock").read_text(), re.M)
    )
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    freeze = subprocess.run(
        [str(clone / ".venv/bin/python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    installed = dict(line.split("==", 1) for line in freeze.splitlines() if "==" in line)
    installed = {name.lower().replace("_", "-"): v for name, v in installed.items()}
    for name in ("python-socketio", "python-engineio", "tornado", "pytest", "setuptools"):
        assert installed[name] == pins[name], name
    strays = {n for n in installed if n not in pins and n not in ("pip", "chatd")}
    assert strays == set(), strays
    assert all(installed[n] == pins[n] for n in installed if n in pins)

    # 3. run.sh: starts chatd on the embedded default; its first lines are the
    # README's sample; Ctrl-C stops everything.
    data = Path(tempfile.mkdtemp(prefix="chatd-clone-data-"))
    log_path = data.parent / f"{data.name}.log"
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["./scripts/run.sh"], cwd=clone, stdout=log, stderr=subprocess.STDOUT,
                env=_env(CHATD_DATA_DIR=str(data), CHATPORT="0"),
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while "cross-origin browsers" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            lines = [x for x in log_path.read_text().splitlines() if not _root_only(x)]
            assert all(STAMP.match(x) for x in lines), lines  # nothing before the first log line
            sample = readme_sample("Its first lines say")
            assert [normalise(x) for x in lines[: len(sample)]] == sample
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lines = log_path.read_text().splitlines()
        ending = readme_sample("Ctrl-C ends with")
        assert [normalise(x) for x in lines[-len(ending) :]] == ending, lines[-5:]
    finally:
        shutil.rmtree(data, ignore_errors=True)
        log_path.unlink(missing_ok=True)
